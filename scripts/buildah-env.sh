# Sourced: the project's own buildah storage (vfs: no overlay mounts, no daemon, works inside a
# container) under the dev cache, so images survive between runs and touch nothing system-wide.
RELAY_CONTAINER_CACHE="${RELAY_DEV_CACHE:-$HOME/.cache/relay-dev}/container"
mkdir -p "$RELAY_CONTAINER_CACHE/storage" "$RELAY_CONTAINER_CACHE/run"
export STORAGE_DRIVER=vfs
relay_buildah() {
  buildah --root "$RELAY_CONTAINER_CACHE/storage" --runroot "$RELAY_CONTAINER_CACHE/run" \
    --storage-driver vfs "$@"
}
