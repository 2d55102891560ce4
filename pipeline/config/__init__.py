from pipeline.config.settings import PROJECT_ROOT, Settings, get_settings
from pipeline.config.tenant import (
    TENANT_ID_PATTERN,
    TenantConfig,
    TenantConfigError,
    is_valid_tenant_id,
    load_tenant,
    load_tenant_file,
    tenant_files,
)

__all__ = [
    "PROJECT_ROOT",
    "TENANT_ID_PATTERN",
    "Settings",
    "TenantConfig",
    "TenantConfigError",
    "get_settings",
    "is_valid_tenant_id",
    "load_tenant",
    "load_tenant_file",
    "tenant_files",
]
