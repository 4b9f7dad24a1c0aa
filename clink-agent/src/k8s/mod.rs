//! Kubernetes mode (issue 11). So far: the CRDs of `clusterlink.net/v1alpha1`, generated from
//! the object model's own spec and status types.

pub mod crd;
