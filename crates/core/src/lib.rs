//! flashmoe-core
