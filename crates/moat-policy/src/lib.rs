//! moat allow-lists, with no I/O. `model` holds the validated domain types (`AccessPolicy`,
//! `MeshConfig`); `document` turns YAML/JSON documents into them with errors that name the line
//! or field; `jwt` checks issuers' key sets and verifies end-user tokens; `eval` is the pure evaluator that the proxy, the control plane and the CLI share:
//! it returns a decision, a stable reason code and a trace of why each rule did or did not match;
//! `target` computes the canonical request path that rules are matched against and that the app
//! receives.

pub mod document;
pub mod eval;
pub mod jwt;
pub mod model;
pub mod suggest;
pub mod target;

pub use document::{
    Document, DocumentError, access_policy_yaml, check_issuers, check_new_documents,
    mesh_config_yaml, parse_documents, parse_new_documents,
};
pub use eval::{Decision, Reason, RuleTrace, Traffic, evaluate, limiting_rules};
pub use model::{
    AccessPolicy, CipherPreference, DefaultPosture, HttpRoute, InvalidValue, JwksSource,
    JwtAlgorithm, JwtIssuer, JwtRequirement, MeshConfig, Method, Mode, PathPattern, PolicyName,
    PolicyVersion, RateKey, RateLimit, Rule, ServiceAccountIssuer,
};
pub use target::{PathError, canonical_path, is_forwarded_method, server_path};
