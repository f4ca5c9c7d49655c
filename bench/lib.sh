# Helpers the bench scripts share; sourced from the repository root.

# A free loopback port (the OS picks it; it is released again before the caller binds it).
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 5 s for something to listen on loopback port $1.
wait_port() {
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done
  echo "port $1 never opened" >&2
  exit 1
}

# The process and its children (nginx's workers).
pids_of() { echo "$1"; pgrep -P "$1" || true; }

# nginx as a round-robin reverse proxy (keep-alive upstream pool, no buffering, no access log):
# the config file $1, listening on port $2, with the main-context directives $3, over the
# backends on the ports after them; its other files in $work.
nginx_conf() {
  local out=$1 listen=$2 main=$3
  shift 3
  {
    printf '%s\npid %s/nginx.pid;\nerror_log %s/nginx-error.log warn;\ndaemon off;\n' "$main" "$work" "$work"
    printf 'worker_rlimit_nofile 16384;\nevents { worker_connections 16384; }\nhttp {\n  access_log off;\n'
    for t in client_body proxy fastcgi uwsgi scgi; do printf '  %s_temp_path %s/%s;\n' "$t" "$work" "$t"; done
    printf '  upstream sims {\n'
    for p in "$@"; do printf '    server 127.0.0.1:%s;\n' "$p"; done
    printf '    keepalive 256;\n  }\n  server {\n    listen 127.0.0.1:%s;\n    location / {\n' "$listen"
    printf '      proxy_pass http://sims;\n      proxy_http_version 1.1;\n      proxy_set_header Connection "";\n'
    printf '      proxy_buffering off;\n      proxy_read_timeout 300s;\n    }\n  }\n}\n'
  } > "$out"
}

# Three instant simulators ($SIM, default the release build), nginx ($NGINX) as a round-robin
# reverse proxy over them and Switchyard ($B) over the same three, with their files in $work.
# Sets S1 S2 S3, PN and NG_MASTER (nginx), PS and SY_PID (Switchyard); returns once all listen.
start_side_by_side() {
  S1=$(port); S2=$(port); S3=$(port); PN=$(port); PS=$(port)
  for p in $S1 $S2 $S3; do
    RUST_LOG=warn "${SIM:-target/release/switchyard}" simulate --listen 127.0.0.1:$p --name "s$p" >/dev/null 2>&1 &
  done
  nginx_conf "$work/nginx.conf" "$PN" "worker_processes auto;" $S1 $S2 $S3
  "$NGINX" -c "$work/nginx.conf" -p "$work" &
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\n[routing]\nstrategy = "round_robin"\n' "$PS"
    for i in 1 2 3; do
      local p_var="S$i"
      printf '[[backends]]\nname = "s%s"\nurl = "http://127.0.0.1:%s"\nauth = { type = "none" }\n' "$i" "${!p_var}"
    done
  } > "$work/switchyard.toml"
  RUST_LOG=warn "$B" serve --config "$work/switchyard.toml" >/dev/null 2>&1 &
  SY_PID=$!
  for p in $S1 $S2 $S3 $PN $PS; do wait_port $p; done
  for _ in $(seq 100); do [ -s "$work/nginx.pid" ] && break; sleep 0.05; done
  NG_MASTER=$(cat "$work/nginx.pid")
}

# The chat completion the load runs send, as a wrk script in $1.
# With SDK=1, each request also carries the headers the OpenAI Python SDK adds.
chat_lua() {
  cat > "$1" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
LUA
  if [ -n "${SDK:-}" ]; then
    cat >> "$1" <<'LUA'
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["User-Agent"] = "AzureOpenAI/Python 1.54.0"
wrk.headers["X-Stainless-Lang"] = "python"
wrk.headers["X-Stainless-Package-Version"] = "1.54.0"
wrk.headers["X-Stainless-OS"] = "Linux"
wrk.headers["X-Stainless-Arch"] = "x64"
wrk.headers["X-Stainless-Runtime"] = "CPython"
wrk.headers["X-Stainless-Runtime-Version"] = "3.12.3"
wrk.headers["X-Stainless-Async"] = "false"
wrk.headers["x-stainless-retry-count"] = "0"
wrk.headers["x-stainless-read-timeout"] = "600"
LUA
  fi
}
