"""`python -m devtools.fault_suite`: see `devtools.fault_suite.suite`."""

from devtools.fault_suite.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
