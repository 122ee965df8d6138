//! The reference sections of the top-level README are the module READMEs, word for word: one
//! text to maintain, read where the code is or where the user is.
#[test]
fn module_readmes_appear_verbatim_in_the_top_level_readme() {
    let top = include_str!("../../README.md");
    for (name, section) in [
        ("node", include_str!("../src/node/README.md")),
        ("identity", include_str!("../src/identity/README.md")),
        (
            "oidc_gateway",
            include_str!("../src/oidc_gateway/README.md"),
        ),
        ("webhook", include_str!("../src/webhook/README.md")),
    ] {
        let section = section.trim_end();
        assert!(
            top.contains(section),
            "README.md no longer contains robin-agent/src/{name}/README.md verbatim; copy the \
             module README into its section (or the other way round)"
        );
    }
}
