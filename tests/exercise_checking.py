"""Shared by the tests of helpers/exercises: run a check and read its printed verdict."""


def verdict(capsys, fn, answer, *context, **kw):
    """(returned value, printed line) of one check."""
    ok = fn(answer, *context, **kw)
    return ok, capsys.readouterr().out.strip()


def assert_wrong(capsys, fn, wrong: dict, *context, **kw):
    """Each wrong answer ({name: (answer, expected hint substring)}) is rejected with its specific hint."""
    for name, (answer, hint) in wrong.items():
        ok, out = verdict(capsys, fn, answer, *context, **kw)
        assert ok is False and hint in out, (name, out)
