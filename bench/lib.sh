# Helpers the bench scripts share; sourced from the repository root.

# A free loopback port (the OS picks it; it is released again before the caller binds it).
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 5 s for something to listen on loopback port $1.
wait_port() {
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done
  echo "port $1 never opened" >&2
  exit 1
}
