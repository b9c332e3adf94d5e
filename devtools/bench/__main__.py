"""`python -m devtools.bench`: see `devtools.bench.run`."""

from devtools.bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
