"""`python -m devtools.demo`: see `devtools.demo.run`."""

from devtools.demo.run import main

if __name__ == "__main__":
    raise SystemExit(main())
