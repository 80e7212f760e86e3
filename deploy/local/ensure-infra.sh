#!/usr/bin/env bash
# Start the machine's RabbitMQ and Redis when they are not answering (never restarts a running one).
set -u
if ! (redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG); then
  echo "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "starting rabbitmq-server"
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
for _ in $(seq 1 60); do
  (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && redis-cli -p 6379 ping 2>/dev/null | grep -q PONG && exit 0
  sleep 1
done
echo "RabbitMQ (127.0.0.1:5672) or Redis (127.0.0.1:6379) did not come up" >&2
exit 1
