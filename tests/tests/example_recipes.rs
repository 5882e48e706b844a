//! Every recipe under `examples/` parses and validates: a renamed field or a bad value in an
//! example is caught here, not by the user who copies it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use whetstone_host::recipe::Recipe;
use whetstone_tests::repo_root;

/// The `.toml` files under `examples/`, recursively, in name order.
fn example_recipes() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![repo_root().join("examples")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_example_recipe_parses_and_validates() {
    let recipes = example_recipes();
    assert!(recipes.len() >= 25, "{recipes:?}");
    let failures: Vec<String> = recipes
        .iter()
        .filter_map(|path| Recipe::from_file(path).err().map(|e| e.to_string()))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    let chatterbot =
        Recipe::from_file(repo_root().join("examples/chatterbot/recipe.toml")).unwrap();
    let loader = chatterbot.data.loader.as_ref().unwrap();
    assert_eq!(loader.kind, "chatterbot");
}
