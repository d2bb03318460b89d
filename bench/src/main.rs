//! `make bench`: taskexec measured side by side with its references, in one run, as ratios.
//! Run through `scripts/with-postgres` with a cluster of its own (the Makefile does that).

mod report;
mod scenarios;
mod system;

use std::time::Instant;

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    system::raise_file_limit();
    let started = Instant::now();
    let env = system::Env::from_environment().await;
    let mut rows = Vec::new();
    rows.extend(scenarios::pick_latency(&env, quick).await);
    rows.extend(scenarios::throughput(&env, quick).await);
    rows.extend(scenarios::submit(&env, quick).await);
    rows.extend(scenarios::idle_cost(&env, quick).await);
    rows.extend(scenarios::wake_fairness(&env, quick).await);
    let machine = system::describe_machine(&env).await;
    report::write(&rows, &machine, quick, started.elapsed());
}
