#!/bin/bash
# Create stream-classifier's topics; safe to run again (--if-not-exists).
#
# Runs in the apache/kafka image (kafka-topics.sh under $KAFKA_HOME, default /opt/kafka),
# from docker compose (kafka-init) and from the Kubernetes Job. Topic names and the
# connection come from the same STREAM_CLASSIFIER_* variables as the service:
#   STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS, _KAFKA__INPUT_TOPICS (comma-separated),
#   _KAFKA__OUTPUT_TOPIC, _KAFKA__DEAD_LETTER_TOPIC, _FEEDBACK__TOPICS (comma-separated),
#   _ACTIVE_LEARNING__TOPIC, _RETRAIN__UPDATES_TOPIC, and for SASL/TLS
#   _KAFKA__SECURITY_PROTOCOL, _KAFKA__SASL_MECHANISM, _KAFKA__SASL_USERNAME,
#   _KAFKA__SASL_PASSWORD, _KAFKA__SSL_CAFILE.
# Sizing: TOPIC_PARTITIONS (input topics; bounds the consumer replicas, default 12),
# TOPIC_REPLICATION_FACTOR (default 1), FEEDBACK_RETENTION_MS (default -1: keep forever).
# The output, dead-letter and review topics take the input topics' partition count; the
# model-updates topic has one partition and is compacted (latest announcement per key).
set -euo pipefail

kafka_topics="${KAFKA_HOME:-/opt/kafka}/bin/kafka-topics.sh"
bootstrap="${STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS:-localhost:9092}"
partitions="${TOPIC_PARTITIONS:-12}"
replication="${TOPIC_REPLICATION_FACTOR:-1}"
feedback_retention_ms="${FEEDBACK_RETENTION_MS:--1}"

# "a, b" or ["a","b"] -> one name per line
names() { printf '%s' "${1:-}" | tr -d '[]" ' | tr ',' '\n' | sed '/^$/d'; }

client_config=()
protocol="${STREAM_CLASSIFIER_KAFKA__SECURITY_PROTOCOL:-PLAINTEXT}"
if [ "$protocol" != "PLAINTEXT" ]; then
  properties="$(mktemp /tmp/client-XXXXXX.properties)"
  trap 'rm -f "$properties"' EXIT
  echo "security.protocol=$protocol" >"$properties"
  if [ -n "${STREAM_CLASSIFIER_KAFKA__SSL_CAFILE:-}" ]; then
    echo "ssl.truststore.type=PEM" >>"$properties"
    echo "ssl.truststore.location=$STREAM_CLASSIFIER_KAFKA__SSL_CAFILE" >>"$properties"
  fi
  mechanism="${STREAM_CLASSIFIER_KAFKA__SASL_MECHANISM:-PLAIN}"
  case "$protocol" in SASL_*)
    case "$mechanism" in
      PLAIN) module=org.apache.kafka.common.security.plain.PlainLoginModule ;;
      SCRAM-*) module=org.apache.kafka.common.security.scram.ScramLoginModule ;;
      *) echo "create-topics: SASL mechanism $mechanism is not supported here" >&2; exit 2 ;;
    esac
    echo "sasl.mechanism=$mechanism" >>"$properties"
    printf 'sasl.jaas.config=%s required username="%s" password="%s";\n' "$module" \
      "${STREAM_CLASSIFIER_KAFKA__SASL_USERNAME:?set the SASL username}" \
      "${STREAM_CLASSIFIER_KAFKA__SASL_PASSWORD:?set the SASL password}" >>"$properties"
    ;;
  esac
  client_config=(--command-config "$properties")
fi

topics() { "$kafka_topics" --bootstrap-server "$bootstrap" "${client_config[@]}" "$@"; }

for attempt in $(seq 1 30); do
  if topics --list >/dev/null 2>&1; then break; fi
  [ "$attempt" -eq 30 ] && { echo "create-topics: broker $bootstrap unreachable" >&2; exit 1; }
  sleep 2
done

create() {  # name partitions [--config k=v ...]
  local name="$1" count="$2"
  shift 2
  topics --create --if-not-exists --topic "$name" --partitions "$count" \
    --replication-factor "$replication" "$@"
  echo "create-topics: $name ($count partitions $*)"
}

for name in $(names "${STREAM_CLASSIFIER_KAFKA__INPUT_TOPICS:-texts}"); do
  create "$name" "$partitions"
done
create "${STREAM_CLASSIFIER_KAFKA__OUTPUT_TOPIC:-predictions}" "$partitions"
create "${STREAM_CLASSIFIER_KAFKA__DEAD_LETTER_TOPIC:-dead-letters}" "$partitions"
for name in $(names "${STREAM_CLASSIFIER_FEEDBACK__TOPICS:-}"); do
  create "$name" "$partitions" --config "retention.ms=$feedback_retention_ms"
done
if [ -n "${STREAM_CLASSIFIER_ACTIVE_LEARNING__TOPIC:-}" ]; then
  create "$STREAM_CLASSIFIER_ACTIVE_LEARNING__TOPIC" "$partitions"
fi
create "${STREAM_CLASSIFIER_RETRAIN__UPDATES_TOPIC:-stream-classifier-model-updates}" 1 \
  --config cleanup.policy=compact
