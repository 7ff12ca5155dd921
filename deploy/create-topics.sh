#!/bin/sh
# Create the streamrec topics with their final partition counts (partitions are never added
# later: that would move keys, and with them session state, between partitions).
set -eu
BOOTSTRAP="${STREAMREC_KAFKA__BOOTSTRAP_SERVERS:-kafka:9092}"
PARTITIONS="${STREAMREC_TOPICS__PARTITIONS:-12}"
RF="${STREAMREC_TOPICS__REPLICATION_FACTOR:-1}"
KT=/opt/kafka/bin/kafka-topics.sh
until "$KT" --bootstrap-server "$BOOTSTRAP" --list >/dev/null 2>&1; do
  echo "waiting for kafka at $BOOTSTRAP"; sleep 2
done
for t in "${STREAMREC_TOPICS__CLICKS:-streamrec-clicks}" \
         "${STREAMREC_TOPICS__RECOMMENDATIONS:-streamrec-recommendations}" \
         "${STREAMREC_TOPICS__DEAD_LETTER:-streamrec-dead-letter}"; do
  "$KT" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$t" \
        --partitions "$PARTITIONS" --replication-factor "$RF"
done
# The changelog of the native engine's worker state, compacted (the worker creates it too;
# the Faust engine declares its tables' changelogs itself, named by the state layout).
APP="${STREAMREC_WORKER__APP_ID:-streamrec}"
for t in "$APP-state-changelog"; do
  "$KT" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$t" \
        --partitions "$PARTITIONS" --replication-factor "$RF" --config cleanup.policy=compact
done
echo "topics ready"
