#!/bin/bash
# A contender for the A/B scripts made of another commit of this repository:
#     tests/bench/code_contender.sh NAME COMMIT [DIR]   (DIR: /var/tmp/rez-lazyfs-reqcost)
# DIR/code-NAME holds the commit's cachecore, fusefs and mount (request_cost.py and
# read_parts.py --ab NAME=DIR/code-NAME); DIR/env-NAME/bin/rez-lazyfs runs them with this
# checkout's environment, pyfuse3 included (levers_warm.py --venv NAME=DIR/env-NAME,
# profile_warm.py --cli NAME=DIR/env-NAME/bin/rez-lazyfs): the daemon it starts imports
# the same code (mount/daemon.py puts its own package root first on PYTHONPATH).
set -euo pipefail
name=$1 commit=$2 base=${3:-/var/tmp/rez-lazyfs-reqcost}
here="$(cd "$(dirname "$0")/../.." && pwd)"
rm -rf "$base/code-$name" "$base/env-$name"
mkdir -p "$base/code-$name" "$base/env-$name/bin"
git -C "$here" archive "$commit" cachecore fusefs mount | tar -x -C "$base/code-$name"
git -C "$here" rev-parse "$commit" > "$base/code-$name/COMMIT"
cat > "$base/env-$name/bin/rez-lazyfs" <<EOT
#!/bin/sh
PYTHONPATH=$base/code-$name\${PYTHONPATH:+:\$PYTHONPATH} exec $here/.venv/bin/python -m mount.cli "\$@"
EOT
chmod +x "$base/env-$name/bin/rez-lazyfs"
