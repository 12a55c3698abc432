"""The experiment runner shared by ``experiments/*.py``: the paper's experiments, one command each.

An experiment is a list of :class:`Stage` s, data -> VLM -> DP(s) -> evaluations, each run by the
entry point that ``make`` runs (``scripts/<x>.py`` in a subprocess of this Python: the same code
path, and a crash stays in its stage)::

    python experiments/table1.py [--preset cpu|paper] [--quick] [--jobs N] [--dry-run] [--out DIR] [name=value ...]

Caching. A stage's key is a hash of its kind, its arguments, its script's config defaults (preset
included; options added later at their neutral value left out, ``stages.KEY_NEUTRAL``) and the keys
of the stages it reads (:mod:`experiments.stages`), so a changed setting, on
the command line or in ``configs/``, reruns exactly the stages that depend on it. A stage runs in
``<out>/stages/<name>-<key>/`` and is finished when its ``stage.json`` exists (written last): a
rerun skips it. A killed stage is run again in the same folder, and resumes there: data generation
and VLM relabelling skip finished episodes, trainings continue from their last checkpoint
(``RESUME=auto``), evaluations from their episode journal. ``<out>/runs.log`` gets one line per
stage run. Folders of other settings stay until deleted by hand.

Scheduling. Trainings run side by side, at most ``--jobs`` at a time (one thread each: on the
2-core machine two trainings share it at almost full speed each); data generation, relabelling
and evaluations use all cores (``WORKERS=2``) and run alone (two evaluations side by side ran
10-20 times slower, README). Stages that read no other stage (data generation) start first,
whatever their place in the list: started after a training, one would wait for it alone.

Projection and progress. ``--dry-run`` prints every stage with its projected time and the total.
The projections are estimates from per-unit costs measured on the 2-core CPU machine
(``experiments.stages.COSTS``); they do not apply to the paper preset's GPU runs. While running, each stage start
and end prints ``[k/N] stage ... elapsed, eta`` (the eta rescaled by how the finished stages
compared with their projections). A stage's own output goes to ``stage.log`` in its folder (and
to the console with ``--jobs 1``).

Results. When all stages are done, :mod:`experiments.report` writes ``results.csv``, ``results.md``
(the paper's layout, the paper's numbers beside ours), ``results.png`` and TensorBoard scalars
(``<out>/tb``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from callbacks.progress import format_duration  # noqa: E402  (h:mm:ss, shared with the training progress lines)
from configs.errors import ConfigError, UserError  # noqa: E402
from experiments.stages import SCRIPTS, TRAININGS, Builder, Stage, settings, stage_keys  # noqa: E402

PRESETS = ("cpu", "paper")


def start_order(stages: list[Stage]) -> list[Stage]:
    """``stages`` with those that read no other stage (data generation) first, else in list order.

    A data stage runs alone, so one left until after a training has started would wait for it
    and idle a core; started first, data for every later training is made before any training."""
    return sorted(stages, key=lambda s: bool(s.inputs))


def schedule_length(stages: list[Stage], durations: dict[str, float], jobs: int, done: set[str] = frozenset()) -> float:
    """Wall time of running ``stages`` (minus ``done``) with the runner's rules, given durations."""
    todo = [s for s in start_order(stages) if s.name not in done]
    finished, running, now = set(done), [], 0.0
    while todo or running:
        for s in list(todo):
            if all(dep in finished for dep, _ in s.inputs.values()) and _may_start(s, [r for _, r in running], jobs):
                running.append((now + durations[s.name], s))
                todo.remove(s)
        if not running:
            raise ValueError("stages wait for stages that never run")
        end, first = min(running, key=lambda r: r[0])
        running.remove((end, first))
        finished.add(first.name)
        now = end
    return now


def _may_start(stage: Stage, running: list[Stage], jobs: int) -> bool:
    if not running:
        return True
    return (stage.kind in TRAININGS and all(r.kind in TRAININGS for r in running) and len(running) < jobs)


# ---------------------------------------------------------------------------- running
@dataclass
class Experiment:
    """What an experiment script defines: its stages and how their evaluations form the results
    (:class:`experiments.report.Layout`)."""

    name: str
    stages: list[Stage]
    layout: object  # experiments.report.Layout


class Runner:
    """Runs an experiment's stages in ``out`` (see the module docstring)."""

    def __init__(self, experiment: Experiment, out: Path, jobs: int = 1, echo: bool | None = None):
        self.exp, self.out, self.jobs = experiment, Path(out), max(1, int(jobs))
        self.echo = self.jobs == 1 if echo is None else echo
        self.keys = stage_keys(experiment.stages)

    def folder(self, name: str) -> Path:
        return self.out / "stages" / f"{name}-{self.keys[name]}"

    def is_done(self, name: str) -> bool:
        return (self.folder(name) / "stage.json").exists()

    def path(self, name: str, sub: str = "") -> Path:
        return self.folder(name) / sub if sub else self.folder(name)

    def command(self, stage: Stage, args: dict | None = None) -> list[str]:
        """The subprocess command of ``stage`` (``args``: its arguments, default ``stage.args``)."""
        items = {**(stage.args if args is None else args), **stage.options}
        for arg, (dep, sub) in stage.inputs.items():
            items[arg] = str(self.path(dep, sub))
        out = self.folder(stage.name)
        if stage.kind == "relabel":
            items["DATA"] = str(out / "data")
        else:
            items["OUT"] = str(out)
        if stage.kind in TRAININGS:
            items["RESUME"] = "auto"
        return [sys.executable, str(ROOT / "scripts" / SCRIPTS[stage.kind]),
                *(f"{k}={_arg(v)}" for k, v in items.items())]

    def commands(self, stage: Stage) -> list[list[str]]:
        """One command, or one per distinct count of a data stage with per-task episodes."""
        episodes = stage.args.get("EPISODES")
        if stage.kind != "data" or not isinstance(episodes, dict):
            return [self.command(stage)]
        groups: dict[int, list[str]] = {}
        for task, n in episodes.items():
            groups.setdefault(int(n), []).append(task)
        return [self.command(stage, {**stage.args, "TASKS": ",".join(ts), "EPISODES": n}) for n, ts in groups.items()]

    # ---------------------------------------------------------------- plan
    def plan_lines(self) -> list[str]:
        stages = self.exp.stages
        done = {s.name for s in stages if self.is_done(s.name)}
        width = max(24, *(len(s.name) for s in stages))
        lines = [f"{'':>6} {'stage':<{width}} {'kind':<10} {'status':<8} {'projected':>10}"]
        for k, s in enumerate(stages, 1):
            status = "done" if s.name in done else ("partial" if self.folder(s.name).exists() else "todo")
            lines.append(f"[{k:>2}/{len(stages)}] {s.name:<{width}} {s.kind:<10} {status:<8} "
                         f"{format_duration(s.estimate):>10}")
        total = schedule_length(stages, {s.name: s.estimate for s in stages}, self.jobs, done)
        serial = sum(s.estimate for s in stages if s.name not in done)
        lines.append(f"projected time of what is left: {format_duration(total)} with --jobs {self.jobs} "
                     f"({format_duration(serial)} one stage at a time); estimates from per-unit costs measured on "
                     f"the 2-core CPU machine (experiments/stages.py COSTS), not for GPU runs")
        return lines

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        """Run what is not done; returns the number of stages run. Raises :class:`StageFailed`."""
        self.out.mkdir(parents=True, exist_ok=True)
        lock = open(self.out / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run of this experiment is using {self.out}; wait for it to end") from None
        try:
            return self._run()
        finally:
            lock.close()

    def _run(self) -> int:
        stages, n = self.exp.stages, len(self.exp.stages)
        index = {s.name: k for k, s in enumerate(stages, 1)}
        finished = {s.name for s in stages if self.is_done(s.name)}
        for s in stages:
            if s.name in finished:
                say(f"[{index[s.name]}/{n}] {s.name}: done before, cached ({self.folder(s.name)})")
        todo = [s for s in start_order(stages) if s.name not in finished]
        running: dict[str, _Running] = {}
        start, ran, spent, projected = time.time(), 0, 0.0, 0.0
        try:
            while todo or running:
                for s in list(todo):
                    if all(dep in finished for dep, _ in s.inputs.values()) and \
                            _may_start(s, [r.stage for r in running.values()], self.jobs):
                        todo.remove(s)
                        running[s.name] = _Running(s, self, echo=self.echo and len(running) == 0)
                        eta = self._eta(finished, running, spent, projected)
                        say(f"[{index[s.name]}/{n}] {s.name} ({s.kind}): started, projected "
                            f"{format_duration(s.estimate)}; elapsed {format_duration(time.time() - start)}, "
                            f"eta {format_duration(eta)}; log {self.folder(s.name) / 'stage.log'}")
                ended = _wait_any(running.values(), heartbeat=not self.echo)
                for r in ended:
                    del running[r.stage.name]
                    if r.returncode != 0:
                        for other in running.values():
                            other.stop()
                        raise StageFailed(r)
                    self._finish(r)
                    finished.add(r.stage.name)
                    ran += 1
                    spent += r.seconds
                    projected += r.stage.estimate
                    eta = self._eta(finished, running, spent, projected)
                    say(f"[{index[r.stage.name]}/{n}] {r.stage.name}: done in {format_duration(r.seconds)}; "
                        f"elapsed {format_duration(time.time() - start)}, eta {format_duration(eta)}")
        except KeyboardInterrupt:
            for r in running.values():
                r.stop()
            raise
        return ran

    def _eta(self, finished: set[str], running: dict, spent: float, projected: float) -> float:
        scale = min(max(spent / projected, 0.25), 4.0) if projected > 0 else 1.0
        durations = {s.name: s.estimate for s in self.exp.stages}
        for name, r in running.items():
            durations[name] = max(durations[name] * scale - r.seconds, 0.0) / scale
        return scale * schedule_length(self.exp.stages, durations, self.jobs, finished)

    def _finish(self, r: "_Running") -> None:
        s = r.stage
        record = {"name": s.name, "kind": s.kind, "key": self.keys[s.name], "args": s.args, "options": s.options,
                  "inputs": {a: str(self.path(d, sub)) for a, (d, sub) in s.inputs.items()},
                  "commands": [" ".join(c[1:]) for c in self.commands(s)], "seconds": round(r.seconds, 1),
                  "projected_seconds": round(s.estimate, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.folder(s.name) / "stage.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.folder(s.name) / "stage.json")
        with open(self.out / "runs.log", "a") as f:
            f.write(f"{record['finished']} {s.name} {s.kind} {self.keys[s.name]} {r.seconds:.0f}s\n")


_CONSOLE = {"line_start": True}  # whether the echoed stage output ended its last line


def say(message: str, **kw) -> None:
    """Print a runner line on a line of its own (a stage's progress bar may have left one open)."""
    print(("" if _CONSOLE["line_start"] else "\n") + message, flush=True, **kw)
    _CONSOLE["line_start"] = True


def _arg(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


class StageFailed(Exception):
    def __init__(self, running: "_Running"):
        self.running = running
        super().__init__(running.stage.name)


class _Running:
    """A stage's commands, run one after the other in a subprocess each, output to ``stage.log``."""

    def __init__(self, stage: Stage, runner: Runner, echo: bool):
        self.stage, self.echo = stage, echo
        self.folder = runner.folder(stage.name)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(self.folder / "stage.log", "ab")
        self.commands = runner.commands(stage)
        self.source = runner.path(*stage.inputs["DATA"]) if stage.kind == "relabel" else None
        self.t0 = time.time()
        self.returncode: int | None = None
        self.proc: subprocess.Popen | None = None
        self._next()

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def _next(self) -> None:
        if self.source is not None:  # relabelling writes into the episode files: a copy of the data
            _copy_dataset(self.source, self.folder / "data")
            self.source = None
        cmd = self.commands.pop(0)
        self.log.write(f"\n$ {' '.join(cmd)}\n".encode())
        self.log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", _END_WITH_PARENT, *cmd], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self.pump.start()

    def _pump(self, stream) -> None:
        while chunk := stream.read1(65536):
            self.log.write(chunk)
            self.log.flush()
            if self.echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                _CONSOLE["line_start"] = chunk.endswith(b"\n")

    def poll(self) -> bool:
        """True once all commands have ended (or one failed)."""
        rc = self.proc.poll()
        if rc is None:
            return False
        self.pump.join(timeout=30)  # EOF, unless a process it left behind still holds the pipe
        if rc != 0 or not self.commands:
            self.returncode = rc
            self.log.close()
            return True
        self._next()
        return False

    def last_line(self) -> str:
        try:
            with open(self.folder / "stage.log", "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 4096))
                tail = f.read().decode(errors="replace")
        except OSError:
            return ""
        parts = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
        return parts[-1][:160] if parts else ""

    def stop(self) -> None:
        """End the stage's process (Ctrl-C reached it too; give it time to end its work cleanly)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait()


# Runs a stage's command after asking Linux to SIGTERM it when the runner dies (even by SIGKILL;
# prctl PR_SET_PDEATHSIG survives exec), so no stage goes on orphaned beside the rerun that resumes
# it. A tiny exec wrapper rather than Popen's preexec_fn, which is unsafe with the runner's threads.
_END_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\nexcept OSError:\n    pass\n"
                    "os.execv(sys.argv[1], sys.argv[1:])")


def _wait_any(running, heartbeat: bool, period: float = 60.0) -> list[_Running]:
    last = time.time()
    while True:
        ended = [r for r in running if r.poll()]
        if ended:
            return ended
        if heartbeat and time.time() - last >= period:
            for r in running:
                say(f"    {r.stage.name} ({format_duration(r.seconds)}): {r.last_line()}")
            last = time.time()
        time.sleep(0.5)


def _copy_dataset(source: Path, target: Path) -> None:
    """Copy a dataset folder (index files keep their relative links) unless already copied."""
    if target.exists():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("stage.json", "stage.log", "quarantine", "*.tmp"))
    os.replace(tmp, target)


# ---------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one error line, exit 2 (run_entry_point), not argparse's usage + error
        raise ConfigError(message)


def main(name: str, build, sizes: dict, argv: list[str], doc: str = "") -> int:
    """The command line of an experiment script: ``build(builder, settings) -> Experiment``,
    ``sizes``: preset -> the experiment's own settings ("cpu", "paper", "quick")."""
    parser = _Parser(prog=f"experiments/{name}.py", description=doc,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=PRESETS, help="cpu (this machine) or paper (GPUs)")
    parser.add_argument("--quick", action="store_true", help="a tiny version (minutes; the tests run it)")
    parser.add_argument("--out", help="output folder (default outputs/exp/<name>[-paper|-quick])")
    parser.add_argument("--jobs", type=int, default=None, help="trainings run side by side (default 2; quick: 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and the projected time only")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the result files from the stages finished so far (a run "
                             "still going, or one that was stopped), unfinished cells left empty")
    parser.add_argument("settings", nargs="*", metavar="name=value", help="change a setting (see --dry-run)")
    args = parser.parse_args(argv)
    if args.quick and args.preset != "cpu":
        raise ConfigError("--quick is the cpu preset at tiny sizes; drop --preset paper")
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else 2)
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1")
    s = settings(sizes, args.preset, args.quick, args.settings)
    builder = Builder(args.preset, args.quick, s)
    experiment = build(builder, s)
    suffix = "-quick" if args.quick else ("-paper" if args.preset == "paper" else "")
    out = Path(args.out or f"outputs/exp/{name}{suffix}")
    runner = Runner(experiment, out, jobs)
    print(f"{name}: preset {args.preset}{' (quick)' if args.quick else ''}, settings "
          + ", ".join(f"{k}={_arg(v)}" for k, v in s.items()) + f"; output {out}")
    print("\n".join(runner.plan_lines()), flush=True)
    if args.dry_run:
        return 0
    from experiments.report import write_results

    if args.report:
        if not any(runner.is_done(st.name) for st in experiment.stages):
            raise ConfigError(f"--report: no stage of this run has finished in {out} (the same settings and "
                              f"--out as the run are needed: they name its stages)")
        print(write_results(experiment, runner, s, args.preset, args.quick))
        return 0

    t0 = time.time()
    try:
        ran = runner.run()
    except StageFailed as e:
        r = e.running
        print(f"\n--- last lines of {r.folder / 'stage.log'}:\n" + _tail(r.folder / "stage.log", 25), file=sys.stderr)
        print(f"error: stage {r.stage.name} failed (exit {r.returncode}); its log: {r.folder / 'stage.log'}; "
              f"the same command resumes", file=sys.stderr)
        return 1
    say(f"\n{ran} stage(s) run, {len(experiment.stages) - ran} cached, in {format_duration(time.time() - t0)}")
    print(write_results(experiment, runner, s, args.preset, args.quick))
    return 0


def _tail(path: Path, n: int) -> str:
    text = path.read_bytes().decode(errors="replace").replace("\r", "\n") if path.exists() else ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-n:])


def run_experiment(name: str, build, sizes: dict, doc: str = "") -> None:
    """``if __name__ == "__main__"`` of an experiment script (user errors: one line, exit 2)."""
    from configs import entry_status

    sys.exit(entry_status(lambda argv: main(name, build, sizes, argv, doc), sys.argv[1:]))
