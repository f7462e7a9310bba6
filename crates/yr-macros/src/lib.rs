//! yr-macros: `#[yr::invoke]` and `#[yr::instance]`. They turn ordinary functions and structs
//! into typed handles (`yr::Function`, `yr::Constructor`, `yr::Method`) and register the entry
//! points in the binary's registry, where a runtime finds them by name. They own no behaviour
//! beyond code generation.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as Tokens, TokenTree};
use quote::{format_ident, quote, ToTokens};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{
    Attribute, FnArg, GenericArgument, ImplItem, ImplItemFn, Item, ItemFn, ItemImpl, ItemStruct,
    Meta, PathArguments, ReturnType, Signature, Token, Type,
};

/// Register a stateless function. See the `yr` crate for the full story.
///
/// ```ignore
/// #[yr::invoke]
/// fn say_hello(name: String) -> String { format!("hello, {name}") }
/// let r = yr::function(say_hello).invoke(("yuanrong",))?;
/// ```
///
/// `#[yr::invoke(return_nums = 2)]` on a function returning a 2-tuple gives two refs. A function
/// returning `Result<T, E>` fails its call with 2002 and `E`'s text on `Err`. An `async fn` runs
/// on yr's async runtime. Inside its body the function's name is its handle, so a function can
/// invoke itself: `yr::function(f).invoke(..)`.
#[proc_macro_attribute]
pub fn invoke(attr: TokenStream, item: TokenStream) -> TokenStream {
    let function = syn::parse_macro_input!(item as ItemFn);
    match expand_invoke(attr.into(), function) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// Declare a stateful instance class: on the struct, and on its `impl` block. Constructors
/// (associated functions returning `Self` or `Result<Self, E>`) and methods (`&self` or
/// `&mut self`, plain or `async`) become `yr::Constructor` and `yr::Method` constants of the
/// same name; a method marked `#[yr::method(return_nums = N)]` becomes a `yr::MultiMethod`.
#[proc_macro_attribute]
pub fn instance(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(Span::call_site(), "#[yr::instance] takes no arguments")
            .to_compile_error()
            .into();
    }
    let item = syn::parse_macro_input!(item as Item);
    let result = match item {
        Item::Struct(item) => expand_instance_struct(item),
        Item::Impl(item) => expand_instance_impl(item),
        other => Err(syn::Error::new(
            other.span(),
            "#[yr::instance] goes on a struct and on its impl block",
        )),
    };
    match result {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// Mark the shutdown hook of an instance class: `fn(&mut self, grace_period: Duration)`, inside a
/// `#[yr::instance] impl` block. It runs when the instance is terminated, within its grace
/// period.
#[proc_macro_attribute]
pub fn shutdown(_attr: TokenStream, item: TokenStream) -> TokenStream {
    outside_instance_impl("shutdown", item)
}

/// Set a method's options inside a `#[yr::instance]` impl block: `#[yr::method(return_nums =
/// N)]` on a method returning an N-tuple makes its calls give N refs (the method's constant is
/// a `yr::MultiMethod`).
///
/// ```ignore
/// #[yr::instance]
/// impl Stats {
///     #[yr::method(return_nums = 2)]
///     fn min_max(&self) -> (i64, i64) { (self.min, self.max) }
/// }
/// let (min, max) = stats.method(Stats::min_max).invoke(())?;
/// ```
#[proc_macro_attribute]
pub fn method(_attr: TokenStream, item: TokenStream) -> TokenStream {
    outside_instance_impl("method", item)
}

/// An attribute that `#[yr::instance]` reads on the methods of its impl block, found anywhere
/// else (which `#[yr::instance]` would have consumed): a compile error.
fn outside_instance_impl(attribute: &str, item: TokenStream) -> TokenStream {
    let item: Tokens = item.into();
    syn::Error::new(
        item.span(),
        format!("#[yr::{attribute}] marks a method inside a #[yr::instance] impl block"),
    )
    .to_compile_error()
    .into()
}

/// How a user function hands back its result.
struct ReturnShape {
    /// The type a caller's `ObjectRef` holds.
    value: Type,
    /// Whether the function returns `Result<value, E>`.
    fallible: bool,
}

fn return_shape(output: &ReturnType) -> ReturnShape {
    match output {
        ReturnType::Default => ReturnShape {
            value: syn::parse_quote!(()),
            fallible: false,
        },
        ReturnType::Type(_, ty) => {
            if let Type::Path(path) = &**ty {
                if let Some(last) = path.path.segments.last() {
                    if last.ident == "Result" {
                        if let PathArguments::AngleBracketed(args) = &last.arguments {
                            if let Some(GenericArgument::Type(ok)) = args.args.first() {
                                return ReturnShape {
                                    value: ok.clone(),
                                    fallible: true,
                                };
                            }
                        }
                    }
                }
            }
            ReturnShape {
                value: (**ty).clone(),
                fallible: false,
            }
        }
    }
}

/// `return_nums = N` (the only option), for `#[yr::invoke(..)]` and `#[yr::method(..)]`.
fn parse_return_nums(attr: Tokens, macro_name: &str) -> syn::Result<Option<usize>> {
    if attr.is_empty() {
        return Ok(None);
    }
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    let mut return_nums = None;
    for meta in metas {
        match &meta {
            Meta::NameValue(nv) if nv.path.is_ident("return_nums") => {
                let value: syn::LitInt = syn::parse2(nv.value.to_token_stream())?;
                let n: usize = value.base10_parse()?;
                if n > 100 {
                    return Err(syn::Error::new(
                        value.span(),
                        "return_nums must be in [0, 100]",
                    ));
                }
                return_nums = Some(n);
            }
            other => {
                return Err(syn::Error::new(
                    other.span(),
                    format!("unknown option; #[yr::{macro_name}] accepts return_nums = N"),
                ))
            }
        }
    }
    Ok(return_nums)
}

/// The parameter types of a signature, skipping the receiver.
fn param_types(sig: &Signature) -> syn::Result<Vec<Type>> {
    let mut types = Vec::new();
    for input in &sig.inputs {
        if let FnArg::Typed(pat) = input {
            if let Type::ImplTrait(_) = &*pat.ty {
                return Err(syn::Error::new(
                    pat.ty.span(),
                    "yr functions take concrete parameter types, not impl Trait",
                ));
            }
            types.push((*pat.ty).clone());
        }
    }
    Ok(types)
}

fn check_plain(sig: &Signature) -> syn::Result<()> {
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "yr functions cannot be generic: a remote call needs one concrete entry point",
        ));
    }
    Ok(())
}

/// A call of user code: awaited on yr's async runtime for an `async fn`.
fn drive(sig: &Signature, call: Tokens) -> Tokens {
    match sig.asyncness {
        Some(_) => quote! { ::yr::__private::block_on(#call)? },
        None => call,
    }
}

/// The code that turns a call's result into `Returns`, the type of the handle, and the number
/// of results: one value, or with `return_nums` the elements of a tuple.
fn returns_of(return_nums: Option<usize>, value: &Type) -> (Tokens, Tokens) {
    match return_nums {
        None => (
            quote! { ::yr::__private::encode_one(&__yr_result) },
            quote! { 1 },
        ),
        Some(n) => (
            quote! { ::yr::MultiReturn::encode(__yr_result) },
            quote! {{
                const _: () = assert!(
                    <#value as ::yr::MultiReturn>::COUNT == #n,
                    "return_nums must equal the number of elements of the returned tuple"
                );
                #n
            }},
        ),
    }
}

fn doc_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
    attrs.iter().filter(|a| a.path().is_ident("doc")).collect()
}

fn expand_invoke(attr: Tokens, function: ItemFn) -> syn::Result<Tokens> {
    let return_nums = parse_return_nums(attr, "invoke")?;
    check_plain(&function.sig)?;
    let name = &function.sig.ident;
    let vis = &function.vis;
    let docs = doc_attrs(&function.attrs);
    let params = param_types(&function.sig)?;
    let arg_names: Vec<_> = (0..params.len())
        .map(|i| format_ident!("__yr_arg{i}"))
        .collect();
    let shape = return_shape(&function.sig.output);
    let value = &shape.value;
    let entry_name = format_ident!("__YR_FUNCTION_{}", name);
    // The user's function keeps its body under another name, beside the handle: inside the
    // body, the function's own name is the handle, so it can invoke itself.
    let user_name = format_ident!("__yr_fn_{}", name);
    let mut user = function.clone();
    user.attrs.retain(|a| !a.path().is_ident("doc"));
    user.vis = syn::Visibility::Inherited;
    user.sig.ident = user_name.clone();

    let call = drive(&function.sig, quote! { #user_name(#(#arg_names),*) });
    let result = if shape.fallible {
        quote! { ::yr::__private::user_result(#entry_name.name, #call)? }
    } else {
        call
    };
    let (encode, count) = returns_of(return_nums, value);
    let handle_type = match return_nums {
        None => quote! { ::yr::Function<(#(#params,)*), #value> },
        Some(_) => quote! { ::yr::MultiFunction<(#(#params,)*), #value> },
    };

    Ok(quote! {
        #[doc(hidden)]
        #[allow(non_snake_case)]
        #user

        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        const #entry_name: ::yr::__private::FunctionEntry = ::yr::__private::FunctionEntry {
            name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
            call: {
                fn __yr_call(
                    __yr_args: &[::yr::__private::Arg],
                ) -> ::yr::Result<::yr::__private::Returns> {
                    let (#(#arg_names,)*): (#(#params,)*) =
                        ::yr::FromArgs::from_args(__yr_args)?;
                    let __yr_result = #result;
                    #encode
                }
                __yr_call
            },
            return_nums: #count,
        };

        ::yr::__private::inventory::submit! { #entry_name }

        #(#docs)*
        #[allow(non_upper_case_globals)]
        #vis const #name: #handle_type = <#handle_type>::__new(#entry_name);
    })
}

fn expand_instance_struct(item: ItemStruct) -> syn::Result<Tokens> {
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "an instance class cannot be generic: a remote instance needs one concrete type",
        ));
    }
    let name = &item.ident;
    Ok(quote! {
        #item

        impl ::yr::Instance for #name {
            const CLASS: &'static str =
                ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name));
        }

        const _: () = ::yr::__private::assert_instance::<#name>();
    })
}

/// Replace `Self` with the class's type, for code outside the impl block.
fn replace_self(tokens: Tokens, class: &Tokens) -> Tokens {
    tokens
        .into_iter()
        .flat_map(|tree| -> Vec<TokenTree> {
            match tree {
                TokenTree::Ident(ident) if ident == "Self" => class.clone().into_iter().collect(),
                TokenTree::Group(group) => {
                    let mut new = proc_macro2::Group::new(
                        group.delimiter(),
                        replace_self(group.stream(), class),
                    );
                    new.set_span(group.span());
                    vec![TokenTree::Group(new)]
                }
                other => vec![other],
            }
        })
        .collect()
}

fn replace_self_type(ty: &Type, class: &Tokens) -> syn::Result<Type> {
    syn::parse2(replace_self(ty.to_token_stream(), class))
}

enum Receiver {
    Shared,
    Exclusive,
}

fn receiver(method: &ImplItemFn) -> syn::Result<Option<Receiver>> {
    match method.sig.inputs.first() {
        Some(FnArg::Receiver(r)) => {
            if r.reference.is_none() {
                return Err(syn::Error::new(
                    r.span(),
                    "instance methods take &self or &mut self; the instance keeps its state",
                ));
            }
            Ok(Some(if r.mutability.is_some() {
                Receiver::Exclusive
            } else {
                Receiver::Shared
            }))
        }
        _ => Ok(None),
    }
}

/// Whether `attribute` is `#[name]` or `#[some::path::name]` (as `#[yr::shutdown]`).
fn is_attribute(attribute: &Attribute, name: &str) -> bool {
    attribute
        .path()
        .segments
        .last()
        .is_some_and(|segment| segment.ident == name)
}

fn has_attribute(method: &ImplItemFn, name: &str) -> bool {
    method.attrs.iter().any(|a| is_attribute(a, name))
}

fn returns_self(method: &ImplItemFn, class_ident: &syn::Ident) -> bool {
    let shape = return_shape(&method.sig.output);
    match &shape.value {
        Type::Path(path) => path.path.is_ident("Self") || path.path.is_ident(class_ident),
        _ => false,
    }
}

fn expand_instance_impl(item: ItemImpl) -> syn::Result<Tokens> {
    if let Some((_, path, _)) = &item.trait_ {
        return Err(syn::Error::new(
            path.span(),
            "#[yr::instance] goes on an inherent impl block, not a trait impl",
        ));
    }
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "an instance class cannot be generic",
        ));
    }
    let class_ident = match &*item.self_ty {
        Type::Path(path) if path.path.segments.len() == 1 => path.path.segments[0].ident.clone(),
        other => {
            return Err(syn::Error::new(
                other.span(),
                "#[yr::instance] impl blocks must name the struct directly",
            ))
        }
    };
    let class: Tokens = item.self_ty.to_token_stream();
    let trait_name = format_ident!("__YrMethodsOf{}", class_ident);

    let mut trait_items = Vec::new();
    let mut trait_impl_items = Vec::new();
    let mut kept_items = Vec::new();
    let mut handles = Vec::new();
    let mut shutdown_hook: Option<syn::Ident> = None;
    let mut constructors = Vec::new();

    for impl_item in &item.items {
        let ImplItem::Fn(method) = impl_item else {
            kept_items.push(impl_item.clone());
            continue;
        };
        let is_shutdown = has_attribute(method, "shutdown");
        let method_options = method.attrs.iter().find(|a| is_attribute(a, "method"));
        let kind = receiver(method)?;
        let is_constructor = kind.is_none() && returns_self(method, &class_ident);
        if !is_shutdown && kind.is_none() && !is_constructor {
            if let Some(attribute) = method_options {
                return Err(syn::Error::new(
                    attribute.span(),
                    "#[yr::method] goes on an instance method (one that takes &self or &mut self)",
                ));
            }
            kept_items.push(impl_item.clone());
            continue;
        }
        check_plain(&method.sig)?;
        let return_nums =
            match method_options {
                Some(attribute) if kind.is_some() && !is_shutdown => match &attribute.meta {
                    Meta::List(list) => parse_return_nums(list.tokens.clone(), "method")?,
                    Meta::Path(_) => None,
                    Meta::NameValue(other) => {
                        return Err(syn::Error::new(
                            other.span(),
                            "write #[yr::method(return_nums = N)]",
                        ))
                    }
                },
                Some(attribute) => return Err(syn::Error::new(
                    attribute.span(),
                    "#[yr::method] goes on an instance method, not a constructor or shutdown hook",
                )),
                None => None,
            };
        if is_shutdown && method.sig.asyncness.is_some() {
            return Err(syn::Error::new(
                method.sig.span(),
                "a shutdown hook cannot be async: it runs within the grace period on its own thread",
            ));
        }

        let mut moved = method.clone();
        moved.vis = syn::Visibility::Inherited;
        moved.attrs.retain(|a| {
            !is_attribute(a, "shutdown") && !is_attribute(a, "method") && !a.path().is_ident("doc")
        });
        let sig = &moved.sig;
        trait_items.push(quote! { #sig; });
        trait_impl_items.push(moved.to_token_stream());

        let name = &method.sig.ident;
        if is_shutdown {
            if kind.is_none() || method.sig.inputs.len() != 2 {
                return Err(syn::Error::new(
                    method.sig.span(),
                    "a shutdown hook is fn(&mut self, grace_period: std::time::Duration)",
                ));
            }
            shutdown_hook = Some(name.clone());
            continue;
        }

        let docs = doc_attrs(&method.attrs);
        let vis = &method.vis;
        let params: Vec<Type> = param_types(&method.sig)?
            .iter()
            .map(|t| replace_self_type(t, &class))
            .collect::<syn::Result<_>>()?;
        let arg_names: Vec<_> = (0..params.len())
            .map(|i| format_ident!("__yr_arg{i}"))
            .collect();
        let shape = return_shape(&method.sig.output);
        let entry_name = format_ident!("__YR_ENTRY_{}", name);
        let full_name = quote! {
            ::core::concat!(
                ::core::module_path!(), "::", ::core::stringify!(#class_ident), "::",
                ::core::stringify!(#name)
            )
        };

        if is_constructor {
            let call = drive(
                &method.sig,
                quote! { <#class as #trait_name>::#name(#(#arg_names),*) },
            );
            let value = if shape.fallible {
                quote! { ::yr::__private::user_result(#full_name, #call)? }
            } else {
                call
            };
            constructors.push((
                entry_name.clone(),
                quote! {
                    fn __yr_call(
                        __yr_args: &[::yr::__private::Arg],
                    ) -> ::yr::Result<::std::boxed::Box<::yr::__private::InstanceState>> {
                        let (#(#arg_names,)*): (#(#params,)*) =
                            ::yr::FromArgs::from_args(__yr_args)?;
                        let __yr_instance: #class = #value;
                        ::core::result::Result::Ok(::std::boxed::Box::new(__yr_instance))
                    }
                    __yr_call
                },
                full_name,
            ));
            handles.push(quote! {
                #(#docs)*
                #[allow(non_upper_case_globals)]
                #vis const #name: ::yr::Constructor<#class, (#(#params,)*)> =
                    ::yr::Constructor::__new(Self::#entry_name);
            });
            continue;
        }

        let value = replace_self_type(&shape.value, &class)?;
        let (state_param, downcast, variant) = match kind {
            Some(Receiver::Exclusive) => (
                quote! { &mut ::yr::__private::InstanceState },
                quote! { downcast_mut },
                quote! { Exclusive },
            ),
            _ => (
                quote! { &::yr::__private::InstanceState },
                quote! { downcast_ref },
                quote! { Shared },
            ),
        };
        let call = drive(
            &method.sig,
            quote! { <#class as #trait_name>::#name(__yr_this, #(#arg_names),*) },
        );
        let result = if shape.fallible {
            quote! { ::yr::__private::user_result(#full_name, #call)? }
        } else {
            call
        };
        let (encode, count) = returns_of(return_nums, &value);
        let handle_type = match return_nums {
            None => quote! { ::yr::Method<#class, (#(#params,)*), #value> },
            Some(_) => quote! { ::yr::MultiMethod<#class, (#(#params,)*), #value> },
        };
        handles.push(quote! {
            #[doc(hidden)]
            #[allow(non_upper_case_globals)]
            const #entry_name: ::yr::__private::MethodEntry = ::yr::__private::MethodEntry {
                name: #full_name,
                class: <#class as ::yr::Instance>::CLASS,
                call: ::yr::__private::MethodCall::#variant({
                    fn __yr_call(
                        __yr_state: #state_param,
                        __yr_args: &[::yr::__private::Arg],
                    ) -> ::yr::Result<::yr::__private::Returns> {
                        let __yr_this = __yr_state
                            .#downcast::<#class>()
                            .ok_or_else(|| ::yr::__private::wrong_class(#full_name))?;
                        let (#(#arg_names,)*): (#(#params,)*) =
                            ::yr::FromArgs::from_args(__yr_args)?;
                        let __yr_result: #value = #result;
                        let _: usize = #count;
                        #encode
                    }
                    __yr_call
                }),
            };

            #(#docs)*
            #[allow(non_upper_case_globals)]
            #vis const #name: #handle_type = <#handle_type>::__new(Self::#entry_name);
        });
    }

    let shutdown = match &shutdown_hook {
        Some(hook) => quote! {
            ::core::option::Option::Some({
                fn __yr_shutdown(
                    __yr_state: &mut ::yr::__private::InstanceState,
                    __yr_grace: ::std::time::Duration,
                ) {
                    if let ::core::option::Option::Some(__yr_this) =
                        __yr_state.downcast_mut::<#class>()
                    {
                        <#class as #trait_name>::#hook(__yr_this, __yr_grace);
                    }
                }
                __yr_shutdown
            })
        },
        None => quote! { ::core::option::Option::None },
    };

    let constructor_entries = constructors.iter().map(|(entry_name, body, full_name)| {
        quote! {
            #[doc(hidden)]
            #[allow(non_upper_case_globals)]
            const #entry_name: ::yr::__private::ConstructorEntry =
                ::yr::__private::ConstructorEntry {
                    name: #full_name,
                    class: <#class as ::yr::Instance>::CLASS,
                    call: { #body },
                    shutdown: #shutdown,
                };
        }
    });

    // Every constructor and method entry is registered for the runtime to find by name.
    let mut submits = Vec::new();
    for impl_item in &item.items {
        if let ImplItem::Fn(method) = impl_item {
            if has_attribute(method, "shutdown") {
                continue;
            }
            let kind = receiver(method)?;
            if kind.is_some() || returns_self(method, &class_ident) {
                let entry_name = format_ident!("__YR_ENTRY_{}", method.sig.ident);
                submits.push(quote! {
                    ::yr::__private::inventory::submit! { <#class>::#entry_name }
                });
            }
        }
    }

    let attrs = &item.attrs;
    Ok(quote! {
        // `Sized`, so that a constructor may return `Result<Self, E>`.
        #[doc(hidden)]
        #[allow(non_camel_case_types, clippy::wrong_self_convention)]
        trait #trait_name: ::core::marker::Sized {
            #(#trait_items)*
        }

        impl #trait_name for #class {
            #(#trait_impl_items)*
        }

        #(#attrs)*
        impl #class {
            #(#kept_items)*
            #(#constructor_entries)*
            #(#handles)*
        }

        #(#submits)*
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn impl_error(item: Tokens) -> String {
        let item: ItemImpl = syn::parse2(item).expect("an impl block");
        match expand_instance_impl(item) {
            Ok(_) => panic!("the impl block should be refused"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn a_function_body_sees_its_own_name_as_the_handle() {
        let function: ItemFn = syn::parse_quote! {
            fn fib(n: u64) -> u64 { n }
        };
        let expanded = expand_invoke(Tokens::new(), function).unwrap().to_string();
        // The body lives under a hidden name, beside the handle `fib`.
        assert!(expanded.contains("fn __yr_fn_fib"), "{expanded}");
        assert!(expanded.contains("const fib"), "{expanded}");
    }

    #[test]
    fn an_async_function_is_driven_by_block_on() {
        let function: ItemFn = syn::parse_quote! {
            async fn later(n: u64) -> u64 { n }
        };
        let expanded = expand_invoke(Tokens::new(), function).unwrap().to_string();
        assert!(expanded.contains("block_on"), "{expanded}");
    }

    #[test]
    fn a_method_with_return_nums_becomes_a_multi_method() {
        let item: ItemImpl = syn::parse_quote! {
            impl Stats {
                fn new() -> Self { Stats }
                #[yr::method(return_nums = 2)]
                fn pair(&self) -> (u8, u8) { (1, 2) }
                async fn later(&mut self) -> u8 { 3 }
            }
        };
        let expanded = expand_instance_impl(item).unwrap().to_string();
        assert!(expanded.contains("MultiMethod"), "{expanded}");
        assert!(
            !expanded.contains("yr :: method"),
            "the attribute is consumed"
        );
        assert!(expanded.contains("block_on"), "{expanded}");
    }

    #[test]
    fn method_options_go_on_methods_only_and_take_return_nums_only() {
        let on_constructor = impl_error(quote! {
            impl Stats {
                #[yr::method(return_nums = 2)]
                fn new() -> Self { Stats }
            }
        });
        assert!(
            on_constructor.contains("not a constructor"),
            "{on_constructor}"
        );
        let on_helper = impl_error(quote! {
            impl Stats {
                #[yr::method(return_nums = 2)]
                fn helper(x: u8) -> u8 { x }
            }
        });
        assert!(on_helper.contains("instance method"), "{on_helper}");
        let unknown = impl_error(quote! {
            impl Stats {
                #[yr::method(concurrency_group = 2)]
                fn pair(&self) -> (u8, u8) { (1, 2) }
            }
        });
        assert!(
            unknown.contains("#[yr::method] accepts return_nums"),
            "{unknown}"
        );
        let async_hook = impl_error(quote! {
            impl Stats {
                #[yr::shutdown]
                async fn stop(&mut self, grace: std::time::Duration) {}
            }
        });
        assert!(async_hook.contains("cannot be async"), "{async_hook}");
    }
}
