# This folder is the package digital_worker.operator (setuptools package-dir). When Python runs
# with the repository root first on sys.path (`python3 -m pytest` or `python3 -m pip` from the
# checkout, without -P), it is also found first as the top-level module `operator` and shadows the
# standard library's, which collections, pip and pytest import at startup. Be that module then.
if __name__ == "operator":
    import os as _os

    _stdlib_operator = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    with open(_stdlib_operator, encoding="utf-8") as _source:
        exec(compile(_source.read(), _stdlib_operator, "exec"), globals())
    del _os, _stdlib_operator, _source
