//! `#[derive(Module)]`: a `tensor_core::Module` implementation whose four
//! lists (`params`, `params_mut`, `children`, `children_mut`) are generated
//! from field attributes, so the shared and the mutable lists cannot
//! disagree (docs/architecture.md, "Modules and slots").
//!
//! ```text
//! #[derive(Debug, Module)]
//! #[module(kind = "Linear", forward = run)]
//! pub struct Linear {
//!     #[param] pub weight: Tensor,          // "weight"
//!     #[param] pub bias: Option<Tensor>,    // "bias", listed when present
//! }
//! impl Linear { fn run(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> { ... } }
//! ```
//!
//! Field attributes, listed in declaration order:
//! - `#[param]`: a `Tensor` or `Option<Tensor>` named after the field;
//!   `#[param(name = "w")]` gives another name, `#[param(name_expr = "self.names.w.as_str()")]`
//!   computes it from other fields;
//! - `#[child]`: a `Slot` or `Option<Slot>`, with the same `name` /
//!   `name_expr` options (`name = ""`: a transparent child);
//! - `#[params]`: a `Vec<(N, Tensor)>` and `#[children]`: a `Vec<(N, Slot)>`
//!   with `N: AsRef<str>`, each entry under its own name;
//!   `#[children(names = "layer_names")]` on a `Vec<Slot>` takes the names
//!   from a parallel `Vec` field.
//!
//! The struct attribute names the module's `kind` (default: the type's name;
//! `kind_expr = "self.names.kind"` computes it) and the inherent method that
//! computes `forward`.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote};
use syn::{Data, DeriveInput, Expr, Fields, Ident, LitStr, Type, parse_macro_input};

#[proc_macro_derive(Module, attributes(module, param, params, child, children))]
pub fn derive_module(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Param,
    Params,
    Child,
    Children,
}

struct Entry {
    role: Role,
    field: Ident,
    optional: bool,
    name: Tokens,
    /// `#[children(names = "f")]`: the names are the parallel `Vec` in field `f`.
    names_field: Option<Ident>,
}

fn is_option(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Option"))
}

fn expand(input: &DeriveInput) -> syn::Result<Tokens> {
    let ty = &input.ident;
    let name = LitStr::new(&ty.to_string(), ty.span());
    let mut kind = quote!(#name);
    let mut forward: Option<Ident> = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("module")) {
        attr.parse_nested_meta(|m| {
            if m.path.is_ident("kind") {
                let s: LitStr = m.value()?.parse()?;
                kind = quote!(#s);
            } else if m.path.is_ident("kind_expr") {
                let s: LitStr = m.value()?.parse()?;
                let e: Expr = s.parse()?;
                kind = quote!(#e);
            } else if m.path.is_ident("forward") {
                forward = Some(m.value()?.parse()?);
            } else {
                return Err(m.error(
                    "expected `kind = \"...\"`, `kind_expr = \"...\"` or `forward = method`",
                ));
            }
            Ok(())
        })?;
    }
    let forward = forward.ok_or_else(|| {
        syn::Error::new_spanned(
            ty,
            "#[derive(Module)] needs #[module(forward = method)], the inherent method computing forward",
        )
    })?;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            ty,
            "#[derive(Module)] works on structs",
        ));
    };
    let named = match &data.fields {
        Fields::Named(f) => f.named.iter().collect(),
        Fields::Unit => Vec::new(),
        Fields::Unnamed(_) => {
            return Err(syn::Error::new_spanned(
                ty,
                "#[derive(Module)] needs named fields (or none)",
            ));
        }
    };
    let mut entries = Vec::new();
    for f in named {
        let field = f.ident.clone().expect("named field");
        for attr in &f.attrs {
            let role = match attr.path().get_ident().map(Ident::to_string).as_deref() {
                Some("param") => Role::Param,
                Some("params") => Role::Params,
                Some("child") => Role::Child,
                Some("children") => Role::Children,
                _ => continue,
            };
            let mut name = {
                let s = LitStr::new(&field.to_string(), field.span());
                quote!(#s)
            };
            let mut names_field = None;
            if matches!(attr.meta, syn::Meta::List(_)) {
                attr.parse_nested_meta(|m| {
                    if m.path.is_ident("names") {
                        let s: LitStr = m.value()?.parse()?;
                        names_field = Some(s.parse::<Ident>()?);
                    } else if m.path.is_ident("name") {
                        let s: LitStr = m.value()?.parse()?;
                        name = quote!(#s);
                    } else if m.path.is_ident("name_expr") {
                        let s: LitStr = m.value()?.parse()?;
                        let e: Expr = s.parse()?;
                        name = quote!(#e);
                    } else {
                        return Err(m.error(
                            "expected `name = \"...\"`, `name_expr = \"...\"` or (on a Vec) `names = \"field\"`",
                        ));
                    }
                    Ok(())
                })?;
            }
            entries.push(Entry {
                role,
                field: field.clone(),
                optional: is_option(&f.ty),
                name,
                names_field,
            });
        }
    }
    let list = |role: Role, many: Role, mutable: bool| -> Vec<Tokens> {
        entries
            .iter()
            .filter(|e| e.role == role || e.role == many)
            .map(|e| {
                let (f, n) = (&e.field, &e.name);
                // A shared child is handed over as `&dyn Module`; tensors and
                // mutable slots as they are.
                let item = if role == Role::Child && !mutable {
                    quote!(t.as_ref())
                } else {
                    quote!(t)
                };
                if let Some(names) = &e.names_field {
                    let iter = if mutable {
                        quote!(iter_mut)
                    } else {
                        quote!(iter)
                    };
                    quote! {
                        for (n, t) in self.#names.iter().zip(self.#f.#iter()) {
                            v.push((::tensor_core::module::list_name(n), #item));
                        }
                    }
                } else if e.role == many {
                    let iter = if mutable {
                        quote!(iter_mut)
                    } else {
                        quote!(iter)
                    };
                    quote! {
                        for (n, t) in self.#f.#iter() {
                            v.push((::tensor_core::module::list_name(n), #item));
                        }
                    }
                } else if e.optional {
                    let r = if mutable { quote!(&mut) } else { quote!(&) };
                    quote! {
                        if let Some(t) = #r self.#f {
                            v.push((#n, #item));
                        }
                    }
                } else {
                    let r = if mutable { quote!(&mut) } else { quote!(&) };
                    let t = format_ident!("t");
                    quote! {
                        let #t = #r self.#f;
                        v.push((#n, #item));
                    }
                }
            })
            .collect()
    };
    let params = list(Role::Param, Role::Params, false);
    let params_mut = list(Role::Param, Role::Params, true);
    let children = list(Role::Child, Role::Children, false);
    let children_mut = list(Role::Child, Role::Children, true);
    let (imp, tys, wher) = input.generics.split_for_impl();
    Ok(quote! {
        impl #imp ::tensor_core::module::Module for #ty #tys #wher {
            fn kind(&self) -> &'static str {
                #kind
            }

            fn forward(
                &self,
                xs: &::tensor_core::tch::Tensor,
                ctx: &mut ::tensor_core::module::Context,
            ) -> ::tensor_core::Result<::tensor_core::tch::Tensor> {
                Self::#forward(self, xs, ctx)
            }

            #[allow(unused_mut)]
            fn params(&self) -> Vec<(&str, &::tensor_core::tch::Tensor)> {
                let mut v: Vec<(&str, &::tensor_core::tch::Tensor)> = Vec::new();
                #(#params)*
                v
            }

            #[allow(unused_mut)]
            fn params_mut(&mut self) -> Vec<(&str, &mut ::tensor_core::tch::Tensor)> {
                let mut v: Vec<(&str, &mut ::tensor_core::tch::Tensor)> = Vec::new();
                #(#params_mut)*
                v
            }

            #[allow(unused_mut)]
            fn children(&self) -> Vec<(&str, &dyn ::tensor_core::module::Module)> {
                let mut v: Vec<(&str, &dyn ::tensor_core::module::Module)> = Vec::new();
                #(#children)*
                v
            }

            #[allow(unused_mut)]
            fn children_mut(&mut self) -> Vec<(&str, &mut ::tensor_core::module::Slot)> {
                let mut v: Vec<(&str, &mut ::tensor_core::module::Slot)> = Vec::new();
                #(#children_mut)*
                v
            }
        }
    })
}
