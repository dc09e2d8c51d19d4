#!/bin/sh
# Offline installer of an edge-llm board package (written by `edge-llm pack`; docs/boards.md).
#
#   sh install.sh [--prefix DIR] [--no-service]
#
# 1. verify.py checks every file against manifest.json and that this machine's CPU and python3
#    are the ones the package was built for; nothing is touched if that fails.
# 2. PREFIX/venv: a virtual environment with the wheelhouse installed with no network
#    (pip --no-index, --no-deps: the wheelhouse is the complete, resolved set).
# 3. PREFIX/bin/edge-llm, PREFIX/bundle (→ ota/bundle, files 0644), PREFIX/board.toml, PREFIX/docs.
# 4. Unless --no-service (needs root): the edge-llm system user, /etc/edge-llm/board.toml (an
#    existing one is kept), /var/lib/edge-llm, PREFIX/ota owned by edge-llm (OTA writes its
#    A/B slots there), the unit in /etc/systemd/system, enabled.
# A failed step leaves the previous installation in place.
set -eu
umask 022

PREFIX=/opt/edge-llm
SERVICE=1
PYTHON=${PYTHON:-python3}

die() { echo "install.sh: error: $*" >&2; exit 1; }
usage() { echo "usage: sh install.sh [--prefix DIR] [--no-service]   (PYTHON=python3.X to pick the interpreter)"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        --no-service) SERVICE=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; the package needs the Python named in manifest.json"
if [ "$SERVICE" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "installing the service needs root; run as root or add --no-service"
fi

"$PYTHON" "$HERE/verify.py" "$HERE" || die "the package failed verification; nothing was installed"

mkdir -p "$PREFIX/bin"
# The old venv stays aside until the new one imports; a failure puts it back.
rm -rf "$PREFIX/venv.old"
[ -d "$PREFIX/venv" ] && mv "$PREFIX/venv" "$PREFIX/venv.old"
restore() {
    rm -rf "$PREFIX/venv"
    [ -d "$PREFIX/venv.old" ] && mv "$PREFIX/venv.old" "$PREFIX/venv"
    die "$1"
}
"$PYTHON" -m venv "$PREFIX/venv" || restore "$PYTHON -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
"$PREFIX/venv/bin/python" -m pip install --quiet --no-index --no-deps --no-cache-dir \
    --disable-pip-version-check --find-links "$HERE/wheelhouse" "$HERE"/wheelhouse/*.whl \
    || restore "pip could not install the wheelhouse"
# Slim the venv (the board runs it, nobody develops in it; a new package replaces it whole):
# pip and setuptools, numpy's test suites and onnxruntime's offline model tools (transformers/,
# quantization/, tools/: used when building models, never by InferenceSession) are ~55 MB of the
# ~195 MB. The import check below and the package test's `generate` run on the slimmed venv.
"$PREFIX/venv/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null 2>&1 || true
SITE=$("$PREFIX/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
find "$SITE/numpy" -type d -name tests -prune -exec rm -rf {} +
rm -rf "$SITE/onnxruntime/transformers" "$SITE/onnxruntime/quantization" "$SITE/onnxruntime/tools"
"$PREFIX/venv/bin/python" -c "import onnxruntime, tokenizers, numpy, paho.mqtt.client, edge_llm.engine" \
    || restore "the installed runtime does not import"
rm -rf "$PREFIX/venv.old"
ln -sf "$PREFIX/venv/bin/edge-llm" "$PREFIX/bin/edge-llm"

# The bundle: PREFIX/ota/bundle, copied next to the old one, then swapped in; PREFIX/bundle is a
# link to it. Updates (edge_llm/ota.py) write only PREFIX/ota (the A/B slots and the `bundle`
# link they switch): the service may write that folder (its owner, the unit's ReadWritePaths)
# and nothing else of the prefix. Slots of an earlier package go: this package's bundle is slot a.
AB="$PREFIX/ota"
mkdir -p "$AB"
rm -rf "$AB/bundle.new" "$AB/bundle.old"
cp -R "$HERE/bundle" "$AB/bundle.new"
find "$AB/bundle.new" -type d -exec chmod 0755 {} +
find "$AB/bundle.new" -type f -exec chmod 0644 {} +
if [ -e "$AB/bundle" ] || [ -L "$AB/bundle" ]; then mv "$AB/bundle" "$AB/bundle.old"; fi
mv "$AB/bundle.new" "$AB/bundle"
rm -rf "$AB/bundle.old" "$AB/slots"
# Older layouts: a plain PREFIX/bundle folder, or PREFIX/bundle -> slots/X with the A/B slots
# (up to two bundles) and the switch's temporary link in PREFIX itself; ota/ holds them now.
# The slots go once the link no longer points into them.
if [ -d "$PREFIX/bundle" ] && [ ! -L "$PREFIX/bundle" ]; then rm -rf "$PREFIX/bundle"; fi
ln -sfn ota/bundle "$PREFIX/bundle"
rm -rf "$PREFIX/slots" "$PREFIX/.bundle.switch"
cp "$HERE/board.toml" "$PREFIX/board.toml"
mkdir -p "$PREFIX/docs"
cp "$HERE/docs/boards.md" "$PREFIX/docs/boards.md"
cp "$HERE/manifest.json" "$PREFIX/package-manifest.json"
echo "installed: $PREFIX/bin/edge-llm, bundle $PREFIX/bundle ($(du -sh "$PREFIX/venv" | cut -f1) venv)"

[ "$SERVICE" = 1 ] || { echo "no service installed (--no-service)"; exit 0; }

getent group edge-llm >/dev/null || groupadd --system edge-llm
if ! id -u edge-llm >/dev/null 2>&1; then
    NOLOGIN=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --gid edge-llm --home-dir /var/lib/edge-llm --no-create-home --shell "$NOLOGIN" edge-llm
fi
install -d -m 0755 /etc/edge-llm
if [ -e /etc/edge-llm/board.toml ]; then
    echo "kept /etc/edge-llm/board.toml; the packaged profile is $PREFIX/board.toml"
else
    install -m 0644 "$HERE/board.toml" /etc/edge-llm/board.toml
fi
install -d -o edge-llm -g edge-llm -m 0700 /var/lib/edge-llm
chown -R edge-llm:edge-llm "$AB"  # the A/B slots: updates over MQTT run as the service user
sed "s#/opt/edge-llm#$PREFIX#g" "$HERE/edge-llm.service" > /etc/systemd/system/edge-llm.service
chmod 0644 /etc/systemd/system/edge-llm.service
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable edge-llm.service
    echo "service enabled: systemctl start edge-llm (journalctl -u edge-llm for its log)"
else
    echo "systemd is not running here: the unit is installed; run 'systemctl enable --now edge-llm' on the board"
fi
