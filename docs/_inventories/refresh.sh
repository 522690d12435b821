#!/usr/bin/env bash
# Regenerates the intersphinx inventories in this folder. The docs build reads them
# instead of fetching https://docs.python.org/3/objects.inv and Flask's and Werkzeug's,
# because this project's machines and CI reach the package registries only.
#
#   python.inv    from Debian's python3-doc package (the Python of the Debian release)
#   flask.inv     built from the sdist of the Flask release installed in the docs venv
#   werkzeug.inv  built from the sdist of the Werkzeug release installed there
#
# Usage (as root on Debian, for apt-get), with the docs environment's Python:
#   bash docs/_inventories/refresh.sh /tmp/docs-venv/bin/python
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-doc >/dev/null
cp "$(ls -d /usr/share/doc/python3.*/html | sort -V | tail -1)/objects.inv" "$here/python.inv"

"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q sphinx pallets-sphinx-themes sphinxcontrib-log-cabinet sphinx-tabs
for project in flask werkzeug; do
    version=$("$python" -c "import importlib.metadata as m; print(m.version('$project'))")
    "$work/venv/bin/pip" download -q --no-deps --no-binary :all: -d "$work" "$project==$version"
    tar -xzf "$work/$project-$version.tar.gz" -C "$work"
    "$work/venv/bin/pip" install -q "$work/$project-$version"
    # Their own links to other projects' docs cannot be resolved offline: only warnings.
    (cd "$work/$project-$version/docs" && "$work/venv/bin/sphinx-build" -q -b html . "$work/$project-html" 2>/dev/null) || true
    cp "$work/$project-html/objects.inv" "$here/$project.inv"
    echo "$project.inv: $project $version"
done
echo "python.inv: $(ls -d /usr/share/doc/python3.*/html | sort -V | tail -1)"
