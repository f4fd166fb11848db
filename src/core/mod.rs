//! The contract every mode shares, and nothing else: the tunnels file, the labels and annotations
//! users and picotun write and their parsers, which pods are picotun's and which tunnels a pod
//! gets, the tunnel server's description, the states a sidecar reports. Pure: nothing here talks
//! to the apiserver or a tunnel server, and nothing here imports the webhook, the controller, the
//! agent or resolution (they all import this).

pub mod api;
pub mod pod;
pub mod report;
pub mod server;
pub mod tunnel;
