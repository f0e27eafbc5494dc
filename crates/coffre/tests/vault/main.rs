//! End-to-end tests of the vault: the real daemon binary on loopback,
//! driven by the real CLI over mutual TLS.

mod audit_rollback;
mod bus;
mod certificates;
mod custody;
mod data;
mod directory;
mod doctor;
mod gateway;
mod harness;
mod key_gone;
mod lifecycle;
mod members;
mod network;
mod nfs;
mod scan;
mod service;
mod source;
mod storage;
mod vms;
mod workloads;
