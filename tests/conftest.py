"""Shared test helpers."""

import pytest

from micronet.cli import main


@pytest.fixture
def cli_fails(capsys):
    """``cli_fails(args, *fragments)``: the CLI exits 2 with a one-line error containing every fragment."""

    def check(args, *fragments):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, f"error is not one line: {err}"
        for fragment in fragments:
            assert fragment in err, err
        return err

    return check
