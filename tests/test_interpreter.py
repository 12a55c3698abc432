"""The skill-code interpreter: what ``parse`` accepts and rejects (the security boundary),
error messages of ``execute`` that need no scene, and that it never calls eval/exec."""

from __future__ import annotations

import ast
import inspect

import pytest

from envs.skills import interpreter as interpreter_module
from envs.skills.api import QUERIES, SKILLS, Pose
from envs.skills.code import actor, assign, call, stored
from envs.skills.interpreter import MAX_DEPTH, MAX_LINE, CodeError, Interpreter


@pytest.fixture(scope="module")
def interp() -> Interpreter:
    # parse() never touches the api, so no api object is needed to validate syntax.
    return Interpreter(api=None)


class PoseDictOnly:
    """Bare stand-in for the API where evaluation only reads/writes ``pose_dict``."""

    def __init__(self, pose_dict=None):
        self.pose_dict = dict(pose_dict or {})


def _nested(depth: int) -> str:
    """``move3d(get_pose(... get_actor('a') ...))`` with ``depth`` get_pose wrappers.

    The string literal sits at depth ``depth + 2`` (move3d is depth 0)."""
    return "move3d(" + "get_pose(" * depth + "get_actor('a')" + ")" * depth + ")"


# ---------------------------------------------------------------------------- rejected
REJECTED = [
    ("import-call", "__import__('os')"),
    ("import-system", "__import__('os').system('ls')"),
    ("open", "open('/etc/passwd')"),
    ("dunder-class", "pick(get_actor('red cube')).__class__"),
    ("func-globals", "get_actor.__globals__"),
    ("subclasses", "().__class__.__bases__[0].__subclasses__()"),
    ("eval", "eval('1')"),
    ("exec", "exec('x=1')"),
    ("lambda", "lambda: 0"),
    ("y-combinator", "(lambda f: f(f))(lambda f: f(f))"),
    ("lambda-arg", "pick(lambda x: x)"),
    ("listcomp", "[x for x in range(10)]"),
    ("listcomp-arg", "pick([x for x in range(10)])"),
    ("import", "import os"),
    ("from-import", "from os import path"),
    ("for-loop", "for i in range(3): pick(get_actor('a'))"),
    ("while-loop", "while True: pass"),
    ("assign-name", "x = 1"),
    ("pose-dict-method", "pose_dict.clear()"),
    ("pose-dict-literal", "pose_dict['a'] = 1"),
    ("pose-dict-skill", "pose_dict['a'] = pick(get_actor('a'))"),
    ("pose-dict-skill-nested", "pose_dict['a'] = get_pose(pick(get_actor('a')))"),
    ("pose-dict-augassign", "pose_dict['a'] += get_pose(get_actor('a'))"),
    ("pose-dict-annassign", "pose_dict['a']: int = get_pose(get_actor('a'))"),
    ("pose-dict-tuple-target", "pose_dict['a'], x = get_pose(get_actor('a'))"),
    ("pose-dict-chained", "pose_dict['a'] = pose_dict['b'] = get_pose(get_actor('a'))"),
    ("other-dict-target", "d['a'] = get_pose(get_actor('a'))"),
    ("query-statement", "get_actor('red cube')"),
    ("skill-as-arg", "move3d(pick(get_actor('a')))"),
    ("skill-as-kwarg", "push(get_actor('a'), towards=done())"),
    ("hold-not-callable", "hold()"),
    ("str-mult", "'a' * 10**9"),
    ("huge-distance", "push(get_actor('a'), distance=10**100)"),
    ("number-over-max", "push(get_actor('a'), distance=1001)"),
    ("too-long", "move3d(" + "9" * 500 + ")"),
    ("inf", "move3d(1e309)"),
    ("neg-inf", "move3d(-1e309)"),
    ("deep-100", "get_pose(" * 100 + "get_actor('a')" + ")" * 100),
    ("deep-over-max", _nested(MAX_DEPTH - 1)),
    ("star-args", "pick(*args)"),
    ("star-kwargs", "pick(**kw)"),
    ("f-string", "pick(get_actor(f'red {x}'))"),
    ("long-string", "pick(get_actor('" + "a" * 81 + "'))"),
    ("bytes", "pick(get_actor(b'red cube'))"),
    ("complex", "move3d(1j)"),
    ("ellipsis", "move3d(...)"),
    ("bare-name-arg", "pick(get_actor)"),
    ("pose-dict-name-arg", "move3d(pose_dict)"),
    ("walrus", "pick((x := get_actor('a')))"),
    ("binop-arg", "push(get_actor('a'), distance=0.1 + 0.1)"),
    ("neg-bool", "move3d(-True)"),
    ("double-neg", "move3d(-(-1))"),
    ("not-op", "move3d((not 1,))"),
    ("call-in-tuple", "move3d((get_actor('a'),))"),
    ("nested-tuple", "move3d(((0.1,), 0.2))"),
    ("long-tuple", "move3d((1, 2, 3, 4, 5, 6, 7, 8))"),
    ("dict-arg", "move3d({'p': 1})"),
    ("semicolon", "a; b"),
    ("semicolon-skills", "pick(get_actor('a')); done()"),
    ("two-lines", "pick(get_actor('a'))\nimport os"),
    ("commented", "# pick(get_actor('a'))"),
    ("empty", ""),
    ("blank", "   \n "),
    ("none", None),
    ("bytes-line", b"done()"),
    ("int-key", "move3d(get_actor('a'), target=pose_dict[0])"),
    ("name-key", "move3d(pose_dict[k])"),
    ("long-key", "move3d(pose_dict['" + "k" * 81 + "'])"),
    ("print", "print('x')"),
    ("globals", "globals()"),
    ("getattr", "getattr(pick, 'x')"),
    ("unknown-nested", "pick(foo('a'))"),
    ("syntax-error", "pick(get_actor('a')"),
]


@pytest.mark.parametrize("line", [c for _, c in REJECTED], ids=[i for i, _ in REJECTED])
def test_parse_rejects(interp, line):
    with pytest.raises(CodeError):
        interp.parse(line)


@pytest.mark.parametrize("line", [c for _, c in REJECTED[:12]], ids=[i for i, _ in REJECTED[:12]])
def test_execute_rejects_before_touching_api(line):
    class Tripwire:
        pose_dict: dict = {}

        def __getattr__(self, name):
            raise AssertionError(f"api.{name} was touched for a rejected line")

    with pytest.raises(CodeError):
        Interpreter(api=Tripwire()).execute(line)


def test_depth_limit_boundary(interp):
    # The literal at exactly MAX_DEPTH parses; one level deeper is rejected with the limit.
    interp.parse(_nested(MAX_DEPTH - 2))
    with pytest.raises(CodeError, match=f"deeper than {MAX_DEPTH}"):
        interp.parse(_nested(MAX_DEPTH - 1))


def test_line_length_boundary(interp):
    exact = "done(" + " " * (MAX_LINE - 6) + ")"
    assert len(exact) == MAX_LINE
    interp.parse(exact)
    interp.parse("  " + exact + "  ")  # surrounding whitespace does not count
    with pytest.raises(CodeError, match=f"longer than {MAX_LINE}"):
        interp.parse("done(" + " " * (MAX_LINE - 5) + ")")


# ---------------------------------------------------------------------------- accepted
ACCEPTED = [
    ("move3d-actor", "move3d(get_actor('red cube'))"),
    ("pick", "pick(get_actor('red cube'))"),
    ("place-on-actor", "place(get_actor('red cube'), get_actor('blue cylinder'))"),
    ("assign-next-to", "pose_dict['target'] = free_space_next_to(get_actor('red cube'), "
                       "get_actor('blue cylinder'), direction='left')"),
    ("place-at-pose", "place(get_actor('red cube'), pose_dict['target'])"),
    ("push-direction", "push(get_actor('red cube'), direction='left', distance=0.1)"),
    ("push-towards", "push(get_actor('red cube'), towards=get_actor('blue cube'))"),
    ("assign-offset", "pose_dict['goal'] = offset_pose(get_actor('red cube'), direction='left', distance=0.1)"),
    ("push-towards-pose", "push(get_actor('red cube'), towards=pose_dict['goal'])"),
    ("topple", "topple(get_actor('red cylinder'))"),
    ("assign-get-pose", "pose_dict['red cube'] = get_pose(get_actor('red cube'))"),
    ("assign-free-space", "pose_dict['free'] = free_space(get_actor('red cube'))"),
    ("done", "done()"),
    ("move3d-tuple", "move3d((0.1, -0.2, 0.05))"),
    ("move3d-list", "move3d([0.1, +0.2, 0.05])"),
    ("assign-copy", "pose_dict['b'] = pose_dict['a']"),
    ("surrounding-space", "   pick(get_actor('red cube'))  \n"),
]


@pytest.mark.parametrize("line", [c for _, c in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_parse_accepts(interp, line):
    stmt = interp.parse(line)
    assert isinstance(stmt, (ast.Expr, ast.Assign))
    if isinstance(stmt, ast.Expr):
        assert stmt.value.func.id in SKILLS
    else:
        assert stmt.targets[0].value.id == "pose_dict"


def _rendered_lines() -> list[tuple[str, str]]:
    a, b = actor("red cube"), actor("blue cylinder")
    return [
        ("move3d-actor", call("move3d", a)),
        ("move3d-stored", call("move3d", stored("target"))),
        ("move3d-tuple", call("move3d", (0.1, -0.2, 0.05))),
        ("pick", call("pick", a)),
        ("place-actor", call("place", a, b)),
        ("place-stored", call("place", a, stored("red cube"))),
        ("push-direction", call("push", a, direction="left", distance=0.123456)),
        ("push-towards", call("push", a, towards=b)),
        ("topple", call("topple", actor("red cylinder"))),
        ("touch", call("touch", a, push=True)),  # ClevrSkills' Touch (imported labels only)
        ("done", call("done")),
        ("assign-get-pose", assign("red cube", call("get_pose", a))),
        ("assign-free-space", assign("free", call("free_space", a))),
        ("assign-next-to", assign("target", call("free_space_next_to", a, b, direction="behind"))),
        ("assign-offset", assign("goal", call("offset_pose", a, direction="front", distance=0.1))),
        ("push-towards-pose", call("push", a, towards=stored("goal"))),
        ("quote-in-name", call("pick", actor("o'brien's cube"))),
    ]


RENDERED = _rendered_lines()


def test_rendered_lines_cover_every_skill_and_query():
    used = {ast.parse(line).body[0] for _, line in RENDERED}
    names = {n.func.id for stmt in used for n in ast.walk(stmt) if isinstance(n, ast.Call)}
    assert set(SKILLS) <= names
    assert set(QUERIES) <= names


@pytest.mark.parametrize("line", [c for _, c in RENDERED], ids=[i for i, _ in RENDERED])
def test_rendered_code_parses(interp, line):
    interp.parse(line)


def test_rendered_float_is_rounded():
    line = call("push", actor("red cube"), direction="left", distance=0.123456)
    assert line == "push(get_actor('red cube'), direction='left', distance=0.1235)"


# ---------------------------------------------------------------------------- messages
def test_unknown_statement_function_is_named(interp):
    with pytest.raises(CodeError, match="'foo'"):
        interp.parse("foo(get_actor('a'))")


def test_unknown_nested_function_is_named():
    with pytest.raises(CodeError, match=r"unknown function 'frobnicate'"):
        Interpreter(api=PoseDictOnly()).execute("pick(frobnicate('a'))")


def test_missing_pose_key_lists_known_keys():
    api = PoseDictOnly({"free": Pose((0.0, 0.0, 0.02)), "red cube": Pose((0.1, 0.0, 0.02))})
    with pytest.raises(CodeError) as e:
        Interpreter(api=api).execute("move3d(pose_dict['target'])")
    msg = str(e.value)
    assert "'target'" in msg
    assert "['free', 'red cube']" in msg


def test_missing_pose_key_in_assignment():
    api = PoseDictOnly()
    with pytest.raises(CodeError, match=r"no key 'a'.*\[\]"):
        Interpreter(api=api).execute("pose_dict['b'] = pose_dict['a']")
    assert api.pose_dict == {}


def test_assignment_stores_poses_only():
    api = PoseDictOnly({"a": "not a pose"})
    with pytest.raises(CodeError, match="poses only"):
        Interpreter(api=api).execute("pose_dict['b'] = pose_dict['a']")
    assert "b" not in api.pose_dict


# ---------------------------------------------------------------------------- no eval/exec
def test_interpreter_source_calls_no_eval_or_exec():
    tree = ast.parse(inspect.getsource(interpreter_module))
    forbidden = {"eval", "exec", "compile", "__import__"}
    called = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in forbidden:
                called.add(name)
    assert not called, f"interpreter calls {sorted(called)}"
    # The check itself sees calls: the module does call ast.parse.
    assert any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "parse"
               for n in ast.walk(tree))
