# Sourced by scripts/demo and scripts/test: make sure .venv exists and holds this checkout.
# The environment is the project's own (never the system's): a top-level package of the
# sidecar would otherwise meet other packages of the same name, such as supervisord's.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

pick_python() {
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "Error: cy-sidecar needs Python 3.11 or newer (python3.11 not found on PATH)" >&2
    return 1
}

if [ ! -x "$venv/bin/python" ]; then
    python="$(pick_python)"
    echo "setting up $venv with $("$python" --version)" >&2
    "$python" -m venv "$venv"
fi

# Reinstall only when the project's metadata changed since the last install.
stamp="$venv/.cy-sidecar-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing cy-sidecar and its dependencies into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    # PYTHONWARNINGS: setuptools warns on every editable install that a folder named like the
    # package may shadow it; the sidecar's own commands start Python with -P against that.
    PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install --quiet \
        --disable-pip-version-check -e "$root[test]" >&2
    echo "$want" > "$stamp"
fi
