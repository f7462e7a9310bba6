"""yr: a serverless distributed compute engine, with openYuanrong's Python API.

    import yr

    @yr.invoke
    def say_hello(name):
        return "hello, " + name

    yr.init()
    print(yr.get([say_hello.invoke("yuanrong") for _ in range(3)]))
    yr.finalize()

Rust code of the same cluster is called with ``yr.rust_function`` and
``yr.rust_instance_class`` (``yr.cross_language``).
"""

from yr import exception
from yr._yr import ObjectRef
from yr.apis import (cancel, finalize, get, get_instance, init, is_initialized, kill_instance,
                     list_named_instances, put, wait)
from yr.config import ClientInfo, Config, DeploymentConfig, InvokeOptions, UserTLSConfig
from yr.kv import (CacheType, ExistenceOpt, GetParam, GetParams, SetParam, WriteMode, kv_del,
                   kv_exist, kv_get, kv_get_with_param, kv_read, kv_set, kv_write,
                   kv_write_with_param)
from yr.decorator import (FunctionProxy, InstanceCreator, InstanceProxy, MethodProxy, instance,
                          invoke, method)
from yr.stream import (Consumer, Element, Producer, ProducerConfig, SubscriptionConfig,
                       SubscriptionType, create_stream_consumer, create_stream_producer,
                       delete_stream, query_global_consumers_num, query_global_producers_num)
from yr.cross_language import (RustFunctionProxy, RustInstanceCreator, RustInstanceProxy,
                               RustMethodProxy, rust_function, rust_instance_class)

__all__ = [
    "init", "finalize", "is_initialized", "put", "get", "wait", "cancel",
    "get_instance", "list_named_instances", "kill_instance",
    "invoke", "instance", "method", "Config", "InvokeOptions", "ClientInfo", "DeploymentConfig",
    "UserTLSConfig", "ObjectRef",
    "FunctionProxy", "InstanceCreator", "InstanceProxy", "MethodProxy", "exception",
    "kv_write", "kv_write_with_param", "kv_set", "kv_read", "kv_get", "kv_get_with_param",
    "kv_del", "kv_exist", "SetParam", "GetParam", "GetParams", "ExistenceOpt", "WriteMode",
    "CacheType", "rust_function", "rust_instance_class", "RustFunctionProxy",
    "RustInstanceCreator", "RustInstanceProxy", "RustMethodProxy",
    "create_stream_producer", "create_stream_consumer", "delete_stream",
    "query_global_producers_num", "query_global_consumers_num", "Element", "ProducerConfig",
    "SubscriptionConfig", "SubscriptionType", "Producer", "Consumer",
]
