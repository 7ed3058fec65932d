# The verbs a contributor types. `uv run just --list` shows them.

# install the workspace and its dev tools from the lock
sync:
    uv sync --locked

# every test (the README's test command)
test *args:
    uv run pytest {{args}}

# lint and format check
lint:
    uv run ruff check .
    uv run ruff format --check .

# benchmarks against the peers, measured in the same run; rewrites BENCHMARKS.md
bench *args:
    uv run python -m press_play.bench {{args}}
