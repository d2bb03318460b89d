.PHONY: run down down-prune-db logs scale-agents test fuzz dev build bench

# Docker Compose v2 (`docker compose`) when present, else the v1 `docker-compose` binary.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

# Build images and run PostgreSQL, the API and one agent in the background. The first run
# writes .env with random secrets (scripts/make-env) and prints the admin token.
run:
	scripts/make-env
	$(COMPOSE) up -d --build

# Stop and remove the containers (the database volume stays).
down:
	$(COMPOSE) down

# Stop and remove the containers and the database volume.
down-prune-db:
	$(COMPOSE) down -v

# Follow the logs of all services.
logs:
	$(COMPOSE) logs -f

# Run N agents: make scale-agents num=3
scale-agents:
	@test -n "$(num)" || { echo "usage: make scale-agents num=N"; exit 2; }
	$(COMPOSE) up -d --no-recreate --scale task-exec-agent=$(num)

build:
	cargo build --workspace --bins

# All tests against a real PostgreSQL: $DATABASE_URL, else the server on 127.0.0.1:5432,
# else a throwaway cluster started from the installed PostgreSQL binaries. Also checks that
# the offline query data in .sqlx/ is current. Every failure is reported, then a summary.
test: build
	scripts/with-postgres scripts/test

# Schemathesis against the API for longer than `make test` does: a random seed, up to 500
# cases per operation, for at most FUZZ_MINUTES (10). Report in target/fuzz-api/.
fuzz: build
	scripts/with-postgres scripts/fuzz-api --long

# The whole system natively, without Docker: the API on port 3500 and two agents, on a
# database of its own (taskexec_dev) on the PostgreSQL that `make test` would use. Ctrl-C
# stops the agents, then the API.
dev: build
	scripts/with-postgres scripts/dev

# The benchmark (release build, a PostgreSQL cluster of its own, real workers, pgbench as the
# reference); QUICK=1 for a shorter run, ONLY=2,4 for some scenarios. Report in
# target/bench/report.md and report.json.
bench:
	cargo build --release --workspace --bins
	TASKEXEC_OWN_POSTGRES=1 TASKEXEC_PG_OPTIONS="-c shared_preload_libraries=pg_stat_statements" \
		scripts/with-postgres target/release/taskexec-bench $(if $(QUICK),--quick) $(if $(ONLY),--only $(ONLY))
