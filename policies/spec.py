"""Picklable policy descriptions, built into live policies inside (worker) processes.

    spec = PolicySpec("vlm_dp", dp="runs/dp/policy.pt", vlm="runs/vlm/final",
                      options={"regenerate_on_keystep": False, "n_action_steps": 8})
    spec.validate()              # PolicySpecError with one clear message on bad input
    policy = build_policy(spec)  # loads the checkpoints (in the calling process)
    policies = build_policies(spec, 8)  # one per environment of a batch, sharing the networks

Kinds (paper section 5):

==========  ===========================================  ============  =====================
kind        policy                                       needs         options
==========  ===========================================  ============  =====================
oracle      OracleOnly: the scripted oracle              -             -
flat_dp     FlatDP: DP conditioned on the task prompt    dp            chunking, device
vlm_dp      VLMDP: VLM instructions + DP (paper 4.3)     dp, vlm       chunking, regenerate_on_keystep, constrain_objects, keystep_on_hold, query_every_step, confirm_line_end, stop_on_done, device
vlm_oracle  VLMOracle: VLM key-steps + oracle skills     vlm           constrain_objects, device
dp_oracle   DPOracle: DP told the oracle's positions     dp            chunking, regenerate_on_keystep, insert_positions, tracker_slack, pace, max_line_steps, reissue_after, device
==========  ===========================================  ============  =====================

Chunking options: ``n_action_steps`` and ``horizon`` (0 or absent: the checkpoint's own).
``line_end_check`` (vlm_dp, dp_oracle): how a chunk says that the DP's line is over
(:data:`policies.vlm_dp.LINE_END_CHECKS`; read by vlm_dp and by dp_oracle's ``dp`` pace).
``hold_threshold`` and ``snap_holds`` (every kind with a DP): an action holds below ``hold_threshold``
(action units, default 0.05) on every translation axis, for ``line_end_check``; with ``snap_holds``
such an action is executed as an exact hold (:func:`policies.vlm_dp.snap_to_holds`).
``keypoint_peak_window`` and ``keypoint_target_hold`` (every kind with a DP): the DP model's
test-time settings of the same names (``model.*``; absent: the checkpoint's own).
``device``: ``cpu``, ``cuda`` or ``auto`` (CUDA when torch sees it). ``constrain_objects``: the
VLM may only name the scene's objects (absent: the VLM export's own setting; see
``policies.vlm_planner``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from configs.errors import ConfigError, UserError

KINDS = {
    "oracle": (False, False),  # (needs dp, needs vlm)
    "flat_dp": (True, False),
    "vlm_dp": (True, True),
    "vlm_oracle": (False, True),
    "dp_oracle": (True, False),
}
_CHUNKING = {"n_action_steps", "horizon"}
_HOLDS = {"hold_threshold", "snap_holds"}  # ChunkedDP's: every kind with a DP
# test-time settings of the DP's model (DiffusionPolicyModel, no weights) -> the part they need
_DP_MODEL = {"keypoint_peak_window": ("keypoints", "named-object keypoints (model.object_keypoint_weight 0)"),
             "keypoint_target_hold": ("targets", "code targets (model.keypoint_targets false)")}
OPTIONS = {
    "oracle": set(),
    "flat_dp": _CHUNKING | _HOLDS | set(_DP_MODEL) | {"device"},
    "vlm_dp": _CHUNKING | _HOLDS | set(_DP_MODEL) | {"regenerate_on_keystep", "line_end_check", "constrain_objects", "keystep_on_hold",
                           "query_every_step", "max_line_steps", "confirm_line_end", "stop_on_done", "device"},
    "vlm_oracle": {"constrain_objects", "device"},
    "dp_oracle": _CHUNKING | _HOLDS | set(_DP_MODEL) | {"regenerate_on_keystep", "line_end_check", "insert_positions", "tracker_slack",
                              "pace", "max_line_steps", "reissue_after", "device"},
}


class PolicySpecError(UserError, ValueError):
    """An unknown policy kind, a missing or absent checkpoint, or an unknown option."""


@dataclass(frozen=True)
class PolicySpec:
    """What to build: ``kind`` (see the module table), checkpoint paths and options."""

    kind: str
    dp: str | None = None  # diffusion-policy checkpoint: Lightning .ckpt or exported policy .pt
    vlm: str | None = None  # VLM folder / checkpoint for VLMPlanner.from_pretrained
    options: dict = field(default_factory=dict)

    def validate(self, *, dp_later: bool = False) -> "PolicySpec":
        """Check the kind, the checkpoints (they must exist) and the options; ``dp_later``:
        the DP checkpoint is not known yet (the rollout callback exports it each round)."""
        if self.kind not in KINDS:
            raise PolicySpecError(f"unknown policy {self.kind!r}; policies: {sorted(KINDS)}")
        needs_dp, needs_vlm = KINDS[self.kind]
        for name, needed, path in (("DP", needs_dp and not dp_later, self.dp), ("VLM", needs_vlm, self.vlm)):
            if needed and not path:
                raise PolicySpecError(f"policy {self.kind} needs a {name} checkpoint ({name}=...)")
            if needed and not Path(path).exists():
                raise PolicySpecError(f"{name} checkpoint {path} does not exist")
        unknown = set(self.options) - OPTIONS[self.kind]
        if unknown:
            raise PolicySpecError(f"policy {self.kind} has no option(s) {sorted(unknown)}; "
                                  f"options: {sorted(OPTIONS[self.kind])}")
        return self

    @property
    def label(self) -> str:
        """Short name for tables: kind plus non-default options."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()) if k != "device")
        return f"{self.kind}({opts})" if opts else self.kind


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def build_policy(spec: PolicySpec):
    """A fresh :class:`~policies.base.Policy` for ``spec`` (loads its checkpoints)."""
    return build_policies(spec, 1)[0]


def build_policies(spec: PolicySpec, n: int) -> list:
    """``n`` policies for ``spec`` (one per environment of a batch, :mod:`policies.batching`):
    the checkpoints are loaded once and the networks shared (``fork``); each policy has its own
    episode state (planner memory, action queue, DP noise stream)."""
    spec.validate()
    opts = dict(spec.options)
    device = resolve_device(opts.pop("device", None))
    needs_dp, needs_vlm = KINDS[spec.kind]
    dp = vlm = None
    if needs_dp:
        from .diffusion_policy import DiffusionPolicy

        model_overrides = {k: opts.pop(k) for k in list(opts) if k in _DP_MODEL}
        try:
            dp = DiffusionPolicy.from_checkpoint(spec.dp, device=device, model_overrides=model_overrides)
        except ConfigError:
            if not model_overrides:
                raise
            _check_dp_model_overrides(spec.dp, model_overrides, DiffusionPolicy.from_checkpoint(spec.dp).model)
            raise  # the overrides suit the model, but a value is wrong: the model's own message
        _check_dp_model_overrides(spec.dp, model_overrides, dp.model)
    if needs_vlm:
        from .vlm_planner import VLMPlanner

        planner_options = {"constrain_objects": bool(opts["constrain_objects"])} \
            if "constrain_objects" in opts else {}
        vlm = VLMPlanner.from_pretrained(spec.vlm, device=device, **planner_options)
    return [_make(spec, dict(opts), dp if i == 0 or dp is None else dp.fork(),
                  vlm if i == 0 or vlm is None else vlm.fork()) for i in range(int(n))]


def _check_dp_model_overrides(path: str, overrides: dict, model) -> None:
    """PolicySpecError where a test-time model setting needs a part the DP at ``path`` lacks."""
    for name in overrides:
        part, what = _DP_MODEL[name]
        if getattr(model, part) is None:
            raise PolicySpecError(f"{name}: the DP {path} has no {what}")


def _make(spec: PolicySpec, opts: dict, dp, vlm):
    opts.pop("constrain_objects", None)
    chunking = {k: int(opts.pop(k)) or None for k in list(opts) if k in _CHUNKING}
    if "regenerate_on_keystep" in opts:
        chunking["regenerate_on_keystep"] = bool(opts.pop("regenerate_on_keystep"))
    if "line_end_check" in opts:
        chunking["line_end_check"] = str(opts.pop("line_end_check"))
    if "hold_threshold" in opts:
        chunking["hold_threshold"] = float(opts.pop("hold_threshold"))
    if "snap_holds" in opts:
        chunking["snap_holds"] = opts.pop("snap_holds")
    if spec.kind == "oracle":
        from .oracle_only import OracleOnly

        return OracleOnly()
    if spec.kind == "flat_dp":
        from .flat_dp import FlatDP

        return FlatDP(dp, **chunking)
    if spec.kind == "vlm_dp":
        from .vlm_dp import VLMDP

        hold = {k: bool(opts.pop(k)) for k in ("keystep_on_hold", "query_every_step", "stop_on_done") if k in opts}
        for k in ("confirm_line_end", "max_line_steps"):
            if k in opts:
                hold[k] = int(opts.pop(k))
        return VLMDP(vlm, dp, **hold, **chunking)
    if spec.kind == "vlm_oracle":
        from .vlm_oracle import VLMOracle

        return VLMOracle(vlm)
    from .dp_oracle import DPOracle

    slack = {"tracker_slack": float(opts.pop("tracker_slack"))} if "tracker_slack" in opts else {}
    pace = {"pace": str(opts.pop("pace"))} if "pace" in opts else {}
    for k in ("reissue_after", "max_line_steps"):
        if k in opts:
            pace[k] = int(opts.pop(k))
    return DPOracle(dp, insert_positions=bool(opts.pop("insert_positions", True)), **slack, **pace, **chunking)
