//! The HTTP side of the services, one file per service: [`vms`] for `/v1/vms`, [`images`] for
//! `/v1/images` and `/v1/kernels`. Handlers decode requests and shape responses; what a request
//! does lives in the service modules ([`crate::vms`], [`crate::images`]). The router itself is
//! [`crate::daemon::router`].

pub mod images;
pub mod vms;
