//! Test-only validation of HTTP requests against a Swagger 2.0 document (Firecracker's API
//! description), over `serde_yaml::Value`.
//!
//! It checks what a client can get wrong: the path (templates like `/drives/{drive_id}`) and
//! method exist; a body is sent exactly when the operation takes one (required or not); and
//! the body validates against the referenced definition: `$ref` resolution (nested),
//! `type`, `required`, `enum`, `minimum`/`maximum`, array `items`, no `readOnly` property in a
//! request, and no property the schema does not list (as if every object schema had
//! `additionalProperties: false`, unless it says otherwise).

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

pub(crate) struct Spec {
    doc: Yaml,
}

impl Spec {
    pub(crate) fn parse(text: &str) -> Spec {
        let doc: Yaml = serde_yaml::from_str(text).expect("spec is YAML");
        assert_eq!(
            doc.get("swagger").and_then(Yaml::as_str),
            Some("2.0"),
            "only Swagger 2.0 is supported"
        );
        Spec { doc }
    }

    /// The Firecracker v1.16.1 description vendored in this crate.
    pub(crate) fn firecracker() -> Spec {
        Spec::parse(include_str!("../spec/firecracker-v1.16.1.yaml"))
    }

    /// All problems with one request; empty when it conforms.
    pub(crate) fn check_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Json>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        let Some((template, item)) = self.find_path(path) else {
            return vec![format!("{method} {path}: no such path in the API")];
        };
        let Some(op) = item.get(method.to_ascii_lowercase().as_str()) else {
            return vec![format!(
                "{method} {path}: {template} has no {method} operation"
            )];
        };
        let body_param = op
            .get("parameters")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
            .find(|p| p.get("in").and_then(Yaml::as_str) == Some("body"));
        let at = format!("{method} {template}");
        match (body_param, body) {
            (None, None) => {}
            (None, Some(_)) => errors.push(format!("{at}: takes no body, but one was sent")),
            (Some(p), None) => {
                if p.get("required").and_then(Yaml::as_bool) == Some(true) {
                    errors.push(format!("{at}: body is required but none was sent"));
                }
            }
            (Some(p), Some(value)) => match p.get("schema") {
                Some(schema) => self.check_value(schema, value, &format!("{at} body"), &mut errors),
                None => errors.push(format!("{at}: body parameter without schema")),
            },
        }
        errors
    }

    fn find_path(&self, path: &str) -> Option<(&str, &Yaml)> {
        let paths = self.doc.get("paths")?.as_mapping()?;
        let want: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        paths.iter().find_map(|(k, v)| {
            let template = k.as_str()?;
            let segs: Vec<&str> = template.trim_start_matches('/').split('/').collect();
            let matches = segs.len() == want.len()
                && segs.iter().zip(&want).all(|(t, w)| {
                    (t.starts_with('{') && t.ends_with('}') && !w.is_empty()) || t == w
                });
            matches.then_some((template, v))
        })
    }

    fn resolve<'a>(
        &'a self,
        reference: &str,
        at: &str,
        errors: &mut Vec<String>,
    ) -> Option<&'a Yaml> {
        let name = reference.strip_prefix("#/definitions/");
        let found = name.and_then(|n| self.doc.get("definitions")?.get(n));
        if found.is_none() {
            errors.push(format!("{at}: unresolvable $ref {reference}"));
        }
        found
    }

    pub(crate) fn check_value(
        &self,
        schema: &Yaml,
        value: &Json,
        at: &str,
        errors: &mut Vec<String>,
    ) {
        if let Some(reference) = schema.get("$ref").and_then(Yaml::as_str) {
            if let Some(target) = self.resolve(reference, at, errors) {
                let name = reference.trim_start_matches("#/definitions/");
                self.check_value(target, value, &format!("{at} ({name})"), errors);
            }
            return;
        }

        if let Some(options) = schema.get("enum").and_then(Yaml::as_sequence) {
            let allowed: Vec<Json> = options
                .iter()
                .map(|o| serde_json::to_value(o).expect("enum value converts to JSON"))
                .collect();
            if !allowed.contains(value) {
                errors.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }

        let ty = schema.get("type").and_then(Yaml::as_str).or_else(|| {
            // A schema with properties but no type is an object schema.
            schema.get("properties").map(|_| "object")
        });
        match ty {
            Some("object") => self.check_object(schema, value, at, errors),
            Some("array") => match value.as_array() {
                Some(items) => {
                    if let Some(item_schema) = schema.get("items") {
                        for (i, v) in items.iter().enumerate() {
                            self.check_value(item_schema, v, &format!("{at}[{i}]"), errors);
                        }
                    }
                }
                None => errors.push(format!("{at}: expected an array, got {value}")),
            },
            Some("string") if !value.is_string() => {
                errors.push(format!("{at}: expected a string, got {value}"))
            }
            Some("boolean") if !value.is_boolean() => {
                errors.push(format!("{at}: expected a boolean, got {value}"))
            }
            Some("integer") if !(value.is_i64() || value.is_u64()) => {
                errors.push(format!("{at}: expected an integer, got {value}"))
            }
            Some("number") if !value.is_number() => {
                errors.push(format!("{at}: expected a number, got {value}"))
            }
            Some("string" | "boolean" | "integer" | "number") | None => {}
            Some(other) => errors.push(format!("{at}: validator does not know type {other}")),
        }

        if let Some(n) = value.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Yaml::as_f64) {
                if n < min {
                    errors.push(format!("{at}: {n} is below the minimum {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Yaml::as_f64) {
                if n > max {
                    errors.push(format!("{at}: {n} is above the maximum {max}"));
                }
            }
        }
    }

    fn check_object(&self, schema: &Yaml, value: &Json, at: &str, errors: &mut Vec<String>) {
        let Some(obj) = value.as_object() else {
            errors.push(format!("{at}: expected an object, got {value}"));
            return;
        };
        let props = schema.get("properties").and_then(Yaml::as_mapping);
        for req in schema
            .get("required")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(Yaml::as_str)
        {
            if !obj.contains_key(req) {
                errors.push(format!("{at}: required field {req:?} is missing"));
            }
        }
        let additional = schema.get("additionalProperties");
        for (key, v) in obj {
            let prop = props.and_then(|p| p.get(key.as_str()));
            match (prop, additional) {
                (Some(prop_schema), _) => {
                    if prop_schema.get("readOnly").and_then(Yaml::as_bool) == Some(true) {
                        errors.push(format!("{at}: field {key:?} is read-only"));
                    }
                    self.check_value(prop_schema, v, &format!("{at}.{key}"), errors);
                }
                (None, Some(Yaml::Bool(true))) => {}
                (None, Some(extra @ Yaml::Mapping(_))) => {
                    self.check_value(extra, v, &format!("{at}.{key}"), errors)
                }
                (None, _) => errors.push(format!("{at}: unknown field {key:?}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(method: &str, path: &str, body: Option<Json>) -> Vec<String> {
        Spec::firecracker().check_request(method, path, body.as_ref())
    }

    #[test]
    fn valid_requests_pass() {
        assert_eq!(errors("GET", "/", None), Vec::<String>::new());
        assert_eq!(
            errors(
                "PUT",
                "/drives/rootfs",
                Some(json!({
                    "drive_id": "rootfs", "path_on_host": "/x", "is_root_device": true,
                    "cache_type": "Writeback",
                    "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 100}}
                }))
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn unknown_paths_and_methods_are_rejected() {
        assert_eq!(
            errors("PUT", "/nope", Some(json!({}))),
            ["PUT /nope: no such path in the API"]
        );
        assert_eq!(
            errors("DELETE", "/drives/x", None),
            ["DELETE /drives/x: /drives/{drive_id} has no DELETE operation"]
        );
        // A template segment needs a value.
        assert_eq!(errors("PUT", "/drives/", Some(json!({}))).len(), 1);
    }

    #[test]
    fn body_presence_is_checked() {
        assert_eq!(
            errors("PUT", "/actions", None),
            ["PUT /actions: body is required but none was sent"]
        );
        assert_eq!(
            errors("GET", "/", Some(json!({}))),
            ["GET /: takes no body, but one was sent"]
        );
    }

    #[test]
    fn body_schema_violations_are_reported_with_their_location() {
        let e = errors(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 64, "mem_size_mib": "1024", "cpu_count": 1})),
        );
        assert!(e.contains(&"PUT /machine-config body (MachineConfiguration).vcpu_count: 64 is above the maximum 32".to_string()), "{e:?}");
        assert!(e.contains(&"PUT /machine-config body (MachineConfiguration).mem_size_mib: expected an integer, got \"1024\"".to_string()), "{e:?}");
        assert!(
            e.contains(
                &"PUT /machine-config body (MachineConfiguration): unknown field \"cpu_count\""
                    .to_string()
            ),
            "{e:?}"
        );
        assert_eq!(e.len(), 3, "{e:?}");
    }

    #[test]
    fn required_fields_enums_and_nested_refs_are_checked() {
        let e = errors("PUT", "/actions", Some(json!({"action_type": "Reboot"})));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("\"Reboot\" is not one of"), "{e:?}");

        let e = errors("PUT", "/vsock", Some(json!({"uds_path": "/v"})));
        assert_eq!(
            e,
            ["PUT /vsock body (Vsock): required field \"guest_cid\" is missing"]
        );

        // Drive -> RateLimiter -> TokenBucket: the innermost violation is found.
        let e = errors(
            "PUT",
            "/drives/d",
            Some(json!({"drive_id": "d", "is_root_device": false,
                        "rate_limiter": {"ops": {"size": -1, "refill_time": 1, "burst": 2}}})),
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.contains("(TokenBucket).size: -1 is below the minimum 0")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.contains("(TokenBucket): unknown field \"burst\"")),
            "{e:?}"
        );
    }

    #[test]
    fn null_is_not_an_optional_field() {
        let e = errors(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": "/k", "initrd_path": null})),
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("initrd_path: expected a string, got null"),
            "{e:?}"
        );
    }
}
