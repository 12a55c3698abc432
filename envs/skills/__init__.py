"""Robot skill API (the code labels), its closed-loop controllers and a safe interpreter."""

from .api import Actor, Pose, SkillAPI, SKILLS, QUERIES, DIRECTIONS
from .interpreter import CodeError, Interpreter, UnknownObjectError

__all__ = ["Actor", "Pose", "SkillAPI", "SKILLS", "QUERIES", "DIRECTIONS", "CodeError", "Interpreter",
           "UnknownObjectError"]
