"""Development tools: local stand-ins for Discord and Segmind, the environment built on them, and what
runs there (the offline demo, the benchmarks, the fault suite). Nothing here is needed to run the bot.

    fakes/        the Discord and Segmind stand-ins (each also a command line) and a TCP proxy
    stack.py      the stand-ins, a configuration pointing at them and the bot in this process
    launcher.py   the bot as a process of its own (`python bot.py`) against the stand-ins
    demo/         python -m devtools.demo
    bench/        python -m devtools.bench
    fault_suite/  python -m devtools.fault_suite
"""
