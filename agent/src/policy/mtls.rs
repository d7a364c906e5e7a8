//! `MutualTLS` objects.

use super::crd::MutualTLS;
use super::model::PolicyError;

/// Deserializes a MutualTLS, naming the field path of an unknown field or a wrong type.
///
/// # Errors
/// Wrong `apiVersion`/`kind`, unknown fields, wrong types.
pub fn parse_mutual_tls(value: serde_json::Value) -> Result<MutualTLS, PolicyError> {
    super::mesh::parse(value, "MutualTLS")
}
