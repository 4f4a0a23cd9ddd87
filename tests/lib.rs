//! The integration suite lives in the test and bench targets of this package.
