#!/bin/sh
# Temporal's two PostgreSQL databases: created if missing, schema brought up to date.
set -eu
: "${SQL_PASSWORD:?}"
tool() { temporal-sql-tool --plugin postgres12 --ep postgresql -u temporal -p 5432 "$@"; }
for db in temporal temporal_visibility; do
    tool --db "$db" create || true   # already there after the first run
done
tool --db temporal setup-schema -v 0.0 || true
tool --db temporal update-schema -d /etc/temporal/schema/postgresql/v12/temporal/versioned
tool --db temporal_visibility setup-schema -v 0.0 || true
tool --db temporal_visibility update-schema \
    -d /etc/temporal/schema/postgresql/v12/visibility/versioned
echo "Temporal schema ready"
