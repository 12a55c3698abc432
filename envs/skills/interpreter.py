"""A safe interpreter for one line of skill-API code. It never calls ``exec`` or ``eval``.

A line is parsed with :mod:`ast` and walked by hand. Allowed, and nothing else:

* a statement ``skill(...)`` where ``skill`` is one of the API's skills, or
  ``pose_dict['key'] = <expression>`` where the expression is a query call or a ``pose_dict``
  read;
* in arguments: calls of API functions, string / number / bool / None literals (bounded),
  unary minus on numbers, short tuples or lists of literals, ``pose_dict['key']`` reads.

Imports, attributes, names other than the API's, operators, comprehensions, lambdas, loops,
f-strings and anything deeper than ``MAX_DEPTH`` are rejected with :class:`CodeError`.
"""

from __future__ import annotations

import ast
import math

MAX_LINE = 400
MAX_DEPTH = 6
MAX_STRING = 80
MAX_NUMBER = 1e3
MAX_SEQUENCE = 7


class CodeError(ValueError):
    """The code line is not valid skill-API code (or cannot run in this scene)."""


class UnknownObjectError(CodeError):
    """The code names an object that is not in the scene."""


class Interpreter:
    """Evaluates lines against a :class:`~envs.skills.api.SkillAPI`.

    ``execute(line)`` returns the :class:`~envs.skills.api.Skill` to run (an assignment
    returns the API's one-step ``hold`` skill after storing the pose).
    """

    def __init__(self, api):
        from .api import QUERIES, SKILLS

        self.api = api
        self.skills = set(SKILLS)
        self.queries = set(QUERIES)

    # ------------------------------------------------------------------ parsing
    def parse(self, line: str) -> ast.stmt:
        """Validate the syntax of one line; returns its statement node."""
        if not isinstance(line, str):
            raise CodeError("code must be a string")
        text = line.strip()
        if not text:
            raise CodeError("empty code line")
        if len(text) > MAX_LINE:
            raise CodeError(f"code line longer than {MAX_LINE} characters")
        if text.startswith("#"):
            raise CodeError("commented-out line: not a key-step to execute")
        try:
            tree = ast.parse(text, mode="exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            raise CodeError(f"not parseable: {e.__class__.__name__}: {e}") from None
        if len(tree.body) != 1:
            raise CodeError("exactly one statement per line")
        stmt = tree.body[0]
        if isinstance(stmt, ast.Expr):
            call = stmt.value
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
                raise CodeError("a statement must call a skill: " + ", ".join(sorted(self.skills)))
            if call.func.id not in self.skills:
                raise CodeError(f"{call.func.id!r} is not a skill; skills: {sorted(self.skills)}")
        elif isinstance(stmt, ast.Assign):
            if len(stmt.targets) != 1 or self._pose_key(stmt.targets[0]) is None:
                raise CodeError("only pose_dict['key'] = ... may be assigned")
            value = stmt.value
            is_query = (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                        and value.func.id in self.queries)
            if not (is_query or self._pose_key(value) is not None):
                raise CodeError("pose_dict values must come from a query or from pose_dict")
        else:
            raise CodeError(f"{type(stmt).__name__} statements are not allowed")
        self._check(stmt.value, 0)
        return stmt

    @staticmethod
    def _pose_key(node) -> str | None:
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == "pose_dict" and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, str) and len(node.slice.value) <= MAX_STRING):
            return node.slice.value
        return None

    def _check(self, node, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CodeError(f"expression nested deeper than {MAX_DEPTH}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise CodeError("only API functions can be called")
            if node.func.id not in self.skills | self.queries:
                raise CodeError(f"unknown function {node.func.id!r}")
            if depth > 0 and node.func.id in self.skills:
                raise CodeError(f"skill {node.func.id!r} cannot be an argument")
            for a in node.args:
                if isinstance(a, ast.Starred):
                    raise CodeError("*args are not allowed")
                self._check(a, depth + 1)
            for k in node.keywords:
                if k.arg is None:
                    raise CodeError("**kwargs are not allowed")
                self._check(k.value, depth + 1)
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, str):
                if len(v) > MAX_STRING:
                    raise CodeError(f"string literal longer than {MAX_STRING}")
            elif isinstance(v, bool) or v is None:
                pass
            elif isinstance(v, (int, float)):
                if not math.isfinite(v) or abs(v) > MAX_NUMBER:
                    raise CodeError(f"number out of range (|x| <= {MAX_NUMBER:g})")
            else:
                raise CodeError(f"{type(v).__name__} literals are not allowed")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            if not (isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
                    and not isinstance(node.operand.value, bool)):
                raise CodeError("unary minus only on number literals")
            self._check(node.operand, depth + 1)
        elif isinstance(node, (ast.Tuple, ast.List)):
            if len(node.elts) > MAX_SEQUENCE:
                raise CodeError(f"sequences longer than {MAX_SEQUENCE} are not allowed")
            for e in node.elts:
                if not isinstance(e, (ast.Constant, ast.UnaryOp)):
                    raise CodeError("sequences may hold literals only")
                self._check(e, depth + 1)
        elif isinstance(node, ast.Subscript):
            if self._pose_key(node) is None:
                raise CodeError("only pose_dict['key'] may be subscripted")
        else:
            raise CodeError(f"{type(node).__name__} is not allowed")

    # ------------------------------------------------------------------ evaluation
    def _eval(self, node):
        if isinstance(node, ast.Call):
            args = [self._eval(a) for a in node.args]
            kwargs = {k.arg: self._eval(k.value) for k in node.keywords}
            fn = getattr(self.api, node.func.id)
            try:
                return fn(*args, **kwargs)
            except TypeError as e:  # wrong arity or keyword
                raise CodeError(f"bad arguments for {node.func.id}: {e}") from None
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp):
            v = node.operand.value
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(self._eval(e) for e in node.elts)
        if isinstance(node, ast.Subscript):
            key = self._pose_key(node)
            if key not in self.api.pose_dict:
                raise CodeError(f"pose_dict has no key {key!r}; keys: {sorted(self.api.pose_dict)}")
            return self.api.pose_dict[key]
        raise CodeError(f"{type(node).__name__} is not allowed")  # unreachable after parse

    def execute(self, line: str):
        """Parse, check and evaluate ``line``; returns the Skill to run."""
        stmt = self.parse(line)
        if isinstance(stmt, ast.Assign):
            from .api import Pose

            value = self._eval(stmt.value)
            if not isinstance(value, Pose):
                raise CodeError("pose_dict stores poses only")
            self.api.pose_dict[self._pose_key(stmt.targets[0])] = value
            return self.api.hold()
        return self._eval(stmt.value)
