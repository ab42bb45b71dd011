//! Who may do what: join tokens (enrollment), API tokens and operator
//! certificates (the `slipway` CLI), GitHub Actions OIDC tokens (CI without
//! a stored secret), and the caller with its scopes.

pub mod apitoken;
pub mod oidc;
pub mod operator;
pub mod token;
