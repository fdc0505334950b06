//! Where frames come from: image files, and folders of them (sorted by name).

use std::path::{Path, PathBuf};

use crate::HeadError;

/// File extensions treated as images when walking a folder.
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Expands files and folders into the list of image files to process, in order: files as
/// given, each folder's images sorted by name (not recursive).
///
/// # Errors
///
/// [`HeadError::Input`] for a path that does not exist or a folder that cannot be read.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, HeadError> {
    let mut files = Vec::new();
    for input in inputs {
        let input_err = |reason: String| HeadError::Input {
            path: input.display().to_string(),
            reason,
        };
        let meta = std::fs::metadata(input).map_err(|e| input_err(e.to_string()))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| input_err(e.to_string()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| is_image(p))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(input_err(
                    "folder holds no .jpg, .jpeg or .png files".into(),
                ));
            }
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn is_image(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}
