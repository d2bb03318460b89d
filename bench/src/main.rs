//! `make bench`: taskexec measured side by side with its references, in one run, as ratios.
//! Run through `scripts/with-postgres` with a cluster of its own (the Makefile does that).

mod report;
mod scenarios;
mod system;

use std::time::Instant;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only 2,4` runs scenarios 2 and 4 (while working on them).
    let only: Option<Vec<u32>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let wanted = |n: u32| only.as_ref().is_none_or(|only| only.contains(&n));
    system::raise_file_limit();
    let started = Instant::now();
    let env = system::Env::from_environment().await;
    let mut rows = Vec::new();
    if wanted(1) {
        rows.extend(scenarios::pick_latency(&env, quick).await);
    }
    if wanted(2) {
        rows.extend(scenarios::throughput(&env, quick).await);
    }
    if wanted(3) {
        rows.extend(scenarios::submit(&env, quick).await);
    }
    if wanted(4) {
        rows.extend(scenarios::idle_cost(&env, quick).await);
    }
    if wanted(5) {
        rows.extend(scenarios::wake_fairness(&env, quick).await);
    }
    if wanted(6) {
        rows.extend(scenarios::routing(&env, quick).await);
    }
    let machine = system::describe_machine(&env).await;
    report::write(&rows, &machine, quick, started.elapsed());
}
