"""Coverage-guided fuzzing of the protocol cores and configuration loaders (atheris).

    python -m fuzz.run --target all --seconds 60     # every target, one minute each
    python -m fuzz.run --target imap_client --seconds 600
    python -m fuzz.run --replay imap_client fuzz/crashes/imap_client/crash-...

`targets` holds the targets (plain functions of bytes), `checks` the rules they enforce
(shared with the hypothesis state machines in tests/unit/test_*_stateful.py), `seeds`
the starting corpus taken from the unit tests' scenarios, `run` the driver.
"""
