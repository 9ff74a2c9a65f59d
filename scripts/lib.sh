# Helpers for the scripts that run a local nats-server; sourced, not run,
# from the repository root (after scripts/setup.sh installed .cache/bin).

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_nats PORT STORE_DIR LOG: a JetStream nats-server on 127.0.0.1:PORT,
# in the background ($! is its pid).
start_nats() {
  .cache/bin/nats-server -a 127.0.0.1 -p "$1" -js -sd "$2" >"$3" 2>&1 &
}
