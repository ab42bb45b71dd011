//! Who may do what: join tokens (enrollment), API tokens and operator
//! certificates (the `slipway` CLI), and the caller with its scopes.

pub mod apitoken;
pub mod operator;
pub mod token;
