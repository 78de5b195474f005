//! Builders for Nomad's `hclspec.Spec` protos, and the cty type a spec implies (so the msgpack
//! decoder is driven by the very spec we hand to Nomad).

use std::collections::{BTreeMap, HashMap};

use super::cty::CtyType;
use crate::proto::hashicorp::nomad::plugins::shared::hclspec as pb;
use pb::spec::Block as S;

fn wrap(block: S) -> pb::Spec {
    pb::Spec { block: Some(block) }
}

/// `Object{attributes}`: keys are the implied names of direct Attr/Block children.
pub fn object<'a>(attrs: impl IntoIterator<Item = (&'a str, pb::Spec)>) -> pb::Spec {
    let attributes: HashMap<String, pb::Spec> =
        attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    wrap(S::Object(pb::Object { attributes }))
}

/// An attribute of HCL type expression `ty` (named, so it also works under `Default`).
pub fn attr(name: &str, ty: &str, required: bool) -> pb::Spec {
    wrap(S::Attr(pb::Attr {
        name: name.to_string(),
        r#type: ty.to_string(),
        required,
    }))
}

/// An optional block holding `nested`.
pub fn block(name: &str, required: bool, nested: pb::Spec) -> pb::Spec {
    wrap(S::BlockValue(Box::new(pb::Block {
        name: name.to_string(),
        required,
        nested: Some(Box::new(nested)),
    })))
}

/// `primary`, or `default` when primary decodes to null.
pub fn default(primary: pb::Spec, default: pb::Spec) -> pb::Spec {
    wrap(S::Default(Box::new(pb::Default {
        primary: Some(Box::new(primary)),
        default: Some(Box::new(default)),
    })))
}

/// A literal HCL expression (strings must carry their quotes).
pub fn literal(hcl_expr: &str) -> pb::Spec {
    wrap(S::Literal(pb::Literal {
        value: hcl_expr.to_string(),
    }))
}

/// An optional attribute with a default: `Default(Attr{name,..}, Literal(expr))`.
pub fn attr_default(name: &str, ty: &str, hcl_default: &str) -> pb::Spec {
    default(attr(name, ty, false), literal(hcl_default))
}

/// Why a spec's type could not be derived.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// An Attr's type expression is not understood.
    #[error("attribute {name:?}: invalid type expression {expr:?}")]
    BadType {
        /// Attribute.
        name: String,
        /// Expression.
        expr: String,
    },
    /// A spec node without content.
    #[error("empty spec node")]
    Empty,
}

/// The cty type Nomad's decoder produces for `spec` (hcldec's implied type).
pub fn implied_type(spec: &pb::Spec) -> Result<CtyType, SpecError> {
    let Some(block) = &spec.block else {
        return Err(SpecError::Empty);
    };
    Ok(match block {
        S::Object(o) => {
            let mut attrs = BTreeMap::new();
            for (k, v) in &o.attributes {
                attrs.insert(k.clone(), implied_type(v)?);
            }
            CtyType::Object(attrs)
        }
        S::Array(a) => CtyType::Tuple(
            a.values
                .iter()
                .map(implied_type)
                .collect::<Result<_, _>>()?,
        ),
        S::Attr(a) => parse_type_expr(&a.r#type).ok_or_else(|| SpecError::BadType {
            name: a.name.clone(),
            expr: a.r#type.clone(),
        })?,
        S::BlockValue(b) => nested_type(b.nested.as_deref())?,
        S::BlockAttrs(b) => {
            CtyType::Map(Box::new(parse_type_expr(&b.r#type).ok_or_else(|| {
                SpecError::BadType {
                    name: b.name.clone(),
                    expr: b.r#type.clone(),
                }
            })?))
        }
        S::BlockList(b) => CtyType::List(Box::new(nested_type(b.nested.as_deref())?)),
        S::BlockSet(b) => CtyType::Set(Box::new(nested_type(b.nested.as_deref())?)),
        S::BlockMap(b) => {
            let mut t = nested_type(b.nested.as_deref())?;
            for _ in &b.labels {
                t = CtyType::Map(Box::new(t));
            }
            t
        }
        S::Default(d) => match d.primary.as_deref() {
            Some(p) => implied_type(p)?,
            None => return Err(SpecError::Empty),
        },
        S::Literal(_) => CtyType::Dynamic,
    })
}

fn nested_type(nested: Option<&pb::Spec>) -> Result<CtyType, SpecError> {
    match nested {
        Some(n) => implied_type(n),
        None => Ok(CtyType::Object(BTreeMap::new())),
    }
}

/// Parses an HCL type expression: `string`, `number`, `bool`, `any`, `list(T)`, `set(T)`,
/// `map(T)`, `object({k=T,...})`, `tuple([T,...])`.
pub fn parse_type_expr(expr: &str) -> Option<CtyType> {
    let mut p = TypeParser {
        s: expr.as_bytes(),
        i: 0,
    };
    let t = p.ty()?;
    p.ws();
    (p.i == p.s.len()).then_some(t)
}

struct TypeParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl TypeParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.s.get(self.i) == Some(&c)).then(|| self.i += 1)
    }
    fn ident(&mut self) -> Option<String> {
        self.ws();
        let start = self.i;
        while self
            .s
            .get(self.i)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn ty(&mut self) -> Option<CtyType> {
        let name = self.ident()?;
        Some(match name.as_str() {
            "string" => CtyType::String,
            "number" => CtyType::Number,
            "bool" => CtyType::Bool,
            "any" => CtyType::Dynamic,
            "list" | "set" | "map" => {
                self.eat(b'(')?;
                let inner = Box::new(self.ty()?);
                self.eat(b')')?;
                match name.as_str() {
                    "list" => CtyType::List(inner),
                    "set" => CtyType::Set(inner),
                    _ => CtyType::Map(inner),
                }
            }
            "object" => {
                self.eat(b'(')?;
                self.eat(b'{')?;
                let mut attrs = BTreeMap::new();
                loop {
                    if self.eat(b'}').is_some() {
                        break;
                    }
                    let k = self.ident()?;
                    self.eat(b'=')?;
                    attrs.insert(k, self.ty()?);
                    let _ = self.eat(b',');
                }
                self.eat(b')')?;
                CtyType::Object(attrs)
            }
            "tuple" => {
                self.eat(b'(')?;
                self.eat(b'[')?;
                let mut elems = Vec::new();
                loop {
                    if self.eat(b']').is_some() {
                        break;
                    }
                    elems.push(self.ty()?);
                    let _ = self.eat(b',');
                }
                self.eat(b')')?;
                CtyType::Tuple(elems)
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_expressions_parse() {
        assert_eq!(parse_type_expr("string"), Some(CtyType::String));
        assert_eq!(
            parse_type_expr("list(string)"),
            Some(CtyType::List(Box::new(CtyType::String)))
        );
        assert_eq!(
            parse_type_expr(" map( list(number) ) "),
            Some(CtyType::Map(Box::new(CtyType::List(Box::new(
                CtyType::Number
            )))))
        );
        assert_eq!(
            parse_type_expr("object({a = bool, b=any})"),
            Some(CtyType::Object(BTreeMap::from([
                ("a".into(), CtyType::Bool),
                ("b".into(), CtyType::Dynamic)
            ])))
        );
        assert_eq!(
            parse_type_expr("tuple([string, number])"),
            Some(CtyType::Tuple(vec![CtyType::String, CtyType::Number]))
        );
        for bad in [
            "",
            "strin",
            "list(",
            "list(string",
            "map(x)",
            "string extra",
        ] {
            assert_eq!(parse_type_expr(bad), None, "{bad}");
        }
    }

    #[test]
    fn default_and_block_imply_their_primary_type() {
        let spec = object([
            ("a", attr_default("a", "number", "2")),
            (
                "blk",
                default(
                    block("blk", false, object([("x", attr("x", "bool", false))])),
                    literal("{ x = true }"),
                ),
            ),
        ]);
        assert_eq!(
            implied_type(&spec),
            Ok(CtyType::Object(BTreeMap::from([
                ("a".into(), CtyType::Number),
                (
                    "blk".into(),
                    CtyType::Object(BTreeMap::from([("x".into(), CtyType::Bool)]))
                ),
            ])))
        );
    }

    #[test]
    fn bad_type_expression_is_reported_with_the_attribute() {
        let err = implied_type(&attr("port", "integer", false)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "attribute \"port\": invalid type expression \"integer\""
        );
    }
}
