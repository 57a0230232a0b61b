//! Prints the SurgeScaler CRD as YAML: `cargo run --release -p surge-scaler --bin crdgen > deploy/kubernetes/crd.yaml`.

fn main() {
    print!("{}", surge_scaler::k8s::crd::crd_yaml());
}
