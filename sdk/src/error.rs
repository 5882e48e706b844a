//! The SDK's error type.

/// Everything that can go wrong inside a plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host refused a call (bad shapes, unknown parameter, limit reached); the message is
    /// the host's.
    #[error("{0}")]
    Host(String),
    /// The plugin's configuration is invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// The plugin itself failed.
    #[error("{0}")]
    Plugin(String),
    /// A hook this plugin does not provide was called.
    #[error("this plugin does not provide {0}")]
    Unsupported(&'static str),
}

impl Error {
    /// A configuration error.
    pub fn config(message: impl Into<String>) -> Error {
        Error::Config(message.into())
    }

    /// A plugin error.
    pub fn msg(message: impl Into<String>) -> Error {
        Error::Plugin(message.into())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Config(e.to_string())
    }
}

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
