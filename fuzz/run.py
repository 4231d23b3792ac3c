"""Run the atheris targets, each in its own process, and report executions and crashes.

    python -m fuzz.run --target all --seconds 60           # one minute per target
    python -m fuzz.run --target smtp_client,pop3_upstream --seconds 600
    python -m fuzz.run --target all --runs 2000 --seconds 3  # the smoke budget (CI)
    python -m fuzz.run --replay imap_client fuzz/crashes/imap_client/crash-...
    python -m fuzz.run --list

Each target runs in a child process (libFuzzer runs once per process) with its corpus in
`<corpus-dir>/<target>` (seeded from the unit tests, kept between runs, not committed) and
crash inputs written to `<crash-dir>/<target>/`. A crash is any exception out of the
target, a broken rule (`fuzz.checks.Violation`), a timeout or running out of memory.
The exit status is 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
NAMES = (
    "imap_client",
    "imap_upstream",
    "smtp_client",
    "smtp_upstream",
    "pop3_client",
    "pop3_upstream",
    "config_native",
    "config_emailproxy",
)


@dataclass
class Result:
    target: str
    executions: int
    seconds: float
    crashes: list[str]
    coverage: int
    corpus: int
    status: int


def _child(target: str, libfuzzer_args: list[str]) -> None:
    """Inside the child: instrument our code, then hand over to libFuzzer (never returns)."""
    import atheris

    with atheris.instrument_imports(include=["mailwarden_proxy", "fuzz"]):
        from fuzz import targets

    function = targets.TARGETS[target]
    if target.startswith("config_"):
        targets.hermetic_config().__enter__()  # for the life of the process
    atheris.Setup([sys.argv[0], *libfuzzer_args], function)
    atheris.Fuzz()


def _parse(target: str, output: str, seconds: float, status: int, corpus: Path) -> Result:
    executions = 0
    if done := re.findall(r"Done (\d+) runs in", output):
        executions = int(done[-1])
    elif counts := re.findall(r"^#(\d+)\s", output, re.MULTILINE):
        executions = int(counts[-1])
    if stat := re.findall(r"stat::number_of_executed_units: (\d+)", output):
        executions = int(stat[-1])
    covered = re.findall(r"cov: (\d+)", output)
    crashes = re.findall(r"Test unit written to (\S+)", output)
    if status != 0 and not crashes:
        crashes = [f"(exit status {status}, no crash file)"]
    return Result(
        target=target,
        executions=executions,
        seconds=seconds,
        crashes=crashes,
        coverage=int(covered[-1]) if covered else 0,
        corpus=sum(1 for _ in corpus.iterdir()),
        status=status,
    )


def fuzz_one(
    target: str,
    *,
    seconds: int,
    runs: int | None,
    corpus_dir: Path,
    crash_dir: Path,
    verbose: bool,
) -> Result:
    from fuzz import seeds

    corpus = corpus_dir / target
    seeds.write(target, corpus)
    crashes = crash_dir / target
    crashes.mkdir(parents=True, exist_ok=True)
    args = [
        str(corpus),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={crashes}/",
        "-max_len=8192",
        "-timeout=20",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]
    if runs is not None:
        args.append(f"-runs={runs}")
    started = time.monotonic()
    proc = subprocess.run(  # noqa: S603 - this interpreter, our own module
        [sys.executable, "-m", "fuzz.run", "--child", target, "--", *args],
        capture_output=True,
        text=True,
        errors="replace",
        cwd=FUZZ_DIR.parent,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    if verbose or proc.returncode != 0:
        sys.stderr.write(output[-6000:])
    return _parse(target, output, elapsed, proc.returncode, corpus)


def replay(target: str, files: list[str]) -> int:
    from fuzz import targets

    failed = 0
    with targets.hermetic_config():
        for name in files:
            try:
                targets.TARGETS[target](Path(name).read_bytes())
            except Exception:
                failed += 1
                print(f"{name}: FAILED")
                traceback.print_exc()
            else:
                print(f"{name}: ok")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0  # pragma: no cover - libFuzzer exits the process
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="all", help="all, or names separated by commas")
    parser.add_argument("--seconds", type=int, default=60, help="time budget per target")
    parser.add_argument("--runs", type=int, default=None, help="execution budget per target")
    parser.add_argument("--corpus-dir", type=Path, default=FUZZ_DIR / "corpus")
    parser.add_argument("--crash-dir", type=Path, default=FUZZ_DIR / "crashes")
    parser.add_argument("--verbose", action="store_true", help="show libFuzzer's output")
    parser.add_argument("--replay", nargs="+", metavar=("TARGET", "FILE"))
    parser.add_argument("--list", action="store_true", help="list the targets")
    options = parser.parse_args(argv)
    if options.list:
        print("\n".join(NAMES))
        return 0
    if options.replay:
        return replay(options.replay[0], options.replay[1:])
    names = NAMES if options.target == "all" else tuple(options.target.split(","))
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; --list shows them")
    results = []
    print(
        f"{'target':<18} {'executions':>10} {'seconds':>8} {'exec/s':>7} {'cov':>5} "
        f"{'corpus':>6}  crashes",
        flush=True,
    )
    for name in names:
        result = fuzz_one(
            name,
            seconds=options.seconds,
            runs=options.runs,
            corpus_dir=options.corpus_dir,
            crash_dir=options.crash_dir,
            verbose=options.verbose,
        )
        results.append(result)
        rate = result.executions / result.seconds if result.seconds else 0
        print(
            f"{name:<18} {result.executions:>10} {result.seconds:>8.1f} {rate:>7.0f} "
            f"{result.coverage:>5} {result.corpus:>6}  {len(result.crashes)} "
            + " ".join(result.crashes),
            flush=True,
        )
    total = sum(r.executions for r in results)
    crashed = sum(len(r.crashes) for r in results)
    print(
        f"{'total':<18} {total:>10} {sum(r.seconds for r in results):>8.1f}{'':>21}  {crashed}",
        flush=True,
    )
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
