//! Runs every program in `examples/` in-process, so `cargo test` checks that each runs to
//! completion (no network, no sleeping) and returns `Ok`.

#[path = "../examples/durable.rs"]
mod durable;
#[path = "../examples/quickstart.rs"]
mod quickstart;
#[path = "../examples/retry.rs"]
mod retry;
#[path = "../examples/rpc.rs"]
mod rpc;
#[path = "../examples/simulation.rs"]
mod simulation;

#[test]
fn quickstart_runs() {
    quickstart::main().unwrap();
}

#[test]
fn durable_runs() {
    durable::main().unwrap();
}

#[test]
fn retry_runs() {
    retry::main().unwrap();
}

#[test]
fn rpc_runs() {
    rpc::main().unwrap();
}

#[test]
fn simulation_runs() {
    simulation::main().unwrap();
}
