#!/usr/bin/env python3
"""A Kubernetes API server emulator for ClusterLink-rs's end-to-end tests.

No kube-apiserver, kind or envtest can be installed on the build machines (DESIGN.md §9), so
the tests run the real agent, kubectl and kube-rs against this program instead. It keeps every
object in memory and speaks enough of the API for them: discovery, list, watch, get, create,
replace, delete, merge/strategic/JSON patches, server-side apply and the status subresource,
with resource versions, label and field selectors on lists and watches, and the field
ownership that makes server-side apply report conflicts.

It is written on aiohttp directly. kmock 0.8 (which `cargo xtask setup` installs, and which
brings aiohttp and jsonpatch into the same virtual environment) was the starting point, but its
KubernetesEmulator would need nearly every method replaced: it keeps no resource versions, so
watches cannot resume; it replays every object as ADDED on each watch; it streams watches as
application/octet-stream; it ignores PUT, selectors and content types of patches; and it
serves no status subresource. An emulator that owns its state and routing is smaller and
easier to trust than one that patches around all of that.

Usage:
    apiserver.py --listen 127.0.0.1:0 --ready-file F --request-log L [--crds DIR]...

`--listen` takes an IPv4 or [IPv6] address and a port (0 picks one); once listening, the
emulator writes the address it bound (`host:port`) to the ready file. Every request is
appended to the request log as one JSON line before it is handled. SIGTERM or SIGINT stop it:
open watches end and the process exits with status 0. With `--parent-pid`, it also stops once
that process is gone, so a test killed with SIGKILL leaves no emulator behind.

What it does not do is listed in tests/tests/k8s_api.rs, whose tests check what it does.
"""

import argparse
import asyncio
import base64
import copy
import datetime
import ipaddress
import json
import pathlib
import random
import signal
import string
import sys
import uuid

import aiohttp.web as web
import jsonpatch
import yaml

# (group, version, plural, kind, namespaced, has status subresource, short names)
BUILTIN_RESOURCES = [
    ('', 'v1', 'namespaces', 'Namespace', False, True, ['ns']),
    ('', 'v1', 'nodes', 'Node', False, True, ['no']),
    ('', 'v1', 'pods', 'Pod', True, True, ['po']),
    ('', 'v1', 'services', 'Service', True, True, ['svc']),
    ('', 'v1', 'endpoints', 'Endpoints', True, False, ['ep']),
    ('', 'v1', 'events', 'Event', True, False, ['ev']),
    ('', 'v1', 'secrets', 'Secret', True, False, []),
    ('', 'v1', 'configmaps', 'ConfigMap', True, False, ['cm']),
    ('', 'v1', 'serviceaccounts', 'ServiceAccount', True, False, ['sa']),
    ('events.k8s.io', 'v1', 'events', 'Event', True, False, ['ev']),
    ('coordination.k8s.io', 'v1', 'leases', 'Lease', True, False, []),
    ('apiextensions.k8s.io', 'v1', 'customresourcedefinitions', 'CustomResourceDefinition',
     False, True, ['crd', 'crds']),
]

CRD_RESOURCE = ('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')

# Namespaces a fresh cluster has.
INITIAL_NAMESPACES = ['default', 'kube-system', 'kube-public']

# Strategic merge patches merge these lists element by element, by the named key, as the
# Kubernetes types that use them declare (patchMergeKey). Every other list is replaced whole.
MERGE_KEYS = {
    'containers': 'name',
    'initContainers': 'name',
    'env': 'name',
    'volumes': 'name',
    'volumeMounts': 'mountPath',
    'ports': 'port',  # Service ports; container ports use containerPort (below)
    'conditions': 'type',
    'ownerReferences': 'uid',
    'imagePullSecrets': 'name',
}

VERBS = ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch']


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self):
        status = {
            'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
            'message': self.message, 'reason': self.reason, 'code': self.code,
        }
        if self.details is not None:
            status['details'] = self.details
        return status


def not_found(res, name):
    return ApiError(404, 'NotFound', f'{res.qualified} "{name}" not found',
                    {'name': name, 'group': res.group, 'kind': res.plural})


class Resource:
    def __init__(self, group, version, plural, kind, namespaced, status, short_names=(),
                 singular=None, categories=()):
        self.group = group
        self.version = version
        self.plural = plural
        self.kind = kind
        self.namespaced = namespaced
        self.status = status
        self.short_names = list(short_names)
        self.singular = singular or kind.lower()
        self.categories = list(categories)

    @property
    def key(self):
        return (self.group, self.version, self.plural)

    @property
    def api_version(self):
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def qualified(self):
        return f'{self.plural}.{self.group}' if self.group else self.plural

    def discovery(self):
        entries = [{
            'name': self.plural, 'singularName': self.singular, 'namespaced': self.namespaced,
            'kind': self.kind, 'verbs': VERBS, 'shortNames': self.short_names,
            'categories': self.categories,
        }]
        if self.status:
            entries.append({'name': f'{self.plural}/status', 'singularName': '',
                            'namespaced': self.namespaced, 'kind': self.kind,
                            'verbs': ['get', 'patch', 'update']})
        return entries


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


# --- JSON merging ---------------------------------------------------------------------------

def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target, patch, field=None):
    """A strategic merge patch for the types ClusterLink uses: a JSON merge patch in which the
    lists named in MERGE_KEYS merge element by element, `$patch: delete` removes an element,
    `$setElementOrder/<list>` orders one, and other `$` directives are dropped."""
    if not isinstance(patch, dict):
        if isinstance(patch, list) and isinstance(target, list) and field in MERGE_KEYS:
            return merge_list(target, patch, merge_key(field, patch + target))
        return copy.deepcopy(patch)
    if patch.get('$patch') == 'replace':
        return {k: v for k, v in copy.deepcopy(patch).items() if not k.startswith('$')}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    orders = {}
    for key, value in patch.items():
        if key.startswith('$setElementOrder/'):
            orders[key.split('/', 1)[1]] = value
        elif key.startswith('$'):
            continue
        elif value is None:
            result.pop(key, None)
        else:
            result[key] = strategic_merge_patch(result.get(key), value, key)
    for key, order in orders.items():
        items = result.get(key)
        mkey = merge_key(key, order)
        if isinstance(items, list) and mkey:
            rank = {json.dumps(o.get(mkey)): i for i, o in enumerate(order) if isinstance(o, dict)}
            items.sort(key=lambda o: rank.get(json.dumps(o.get(mkey)) if isinstance(o, dict) else '', len(rank)))
    return result


def merge_key(field, items):
    key = MERGE_KEYS.get(field)
    if field == 'ports' and any(isinstance(i, dict) and 'containerPort' in i for i in items):
        key = 'containerPort'
    if key and all(isinstance(i, dict) for i in items):
        return key
    return None


def merge_list(target, patch, key):
    if key is None:
        return [{k: v for k, v in item.items() if not k.startswith('$')}
                if isinstance(item, dict) else item for item in copy.deepcopy(patch)]
    result = copy.deepcopy(target)
    for item in patch:
        index = next((i for i, t in enumerate(result) if t.get(key) == item.get(key)), None)
        if item.get('$patch') == 'delete':
            if index is not None:
                del result[index]
        elif index is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def deep_merge(target, applied):
    """Server-side apply's merge, simplified: maps merge key by key, everything else (lists
    included) is replaced by the applied value."""
    if not isinstance(applied, dict) or not isinstance(target, dict):
        return copy.deepcopy(applied)
    result = copy.deepcopy(target)
    for key, value in applied.items():
        result[key] = deep_merge(result.get(key), value)
    return result


def leaves(obj, prefix=()):
    """The field paths that field ownership tracks: every leaf of the object's maps, without
    apiVersion, kind and the metadata that the server owns (only labels, annotations,
    ownerReferences and finalizers count)."""
    out = {}
    if not isinstance(obj, dict):
        return out
    for key, value in obj.items():
        path = prefix + (key,)
        if not prefix and key in ('apiVersion', 'kind'):
            continue
        if path == ('metadata',):
            for sub in ('labels', 'annotations', 'ownerReferences', 'finalizers'):
                if sub in value:
                    sub_value = value[sub]
                    if isinstance(sub_value, dict):
                        out.update(leaves(sub_value, path + (sub,)))
                    else:
                        out[path + (sub,)] = sub_value
            continue
        if isinstance(value, dict) and value:
            out.update(leaves(value, path))
        else:
            out[path] = value
    return out


def remove_path(obj, path):
    parents = []
    node = obj
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        parents.append((node, key))
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    # Maps the removal emptied go too, as apply removes them.
    for parent, key in reversed(parents):
        if parent[key] == {} and len(path) > 1:
            del parent[key]
        else:
            break


def path_text(path):
    return '.' + '.'.join(path)


# --- Selectors ------------------------------------------------------------------------------

def split_top_level(text):
    parts, depth, current = [], 0, ''
    for char in text:
        if char == '(':
            depth += 1
        elif char == ')':
            depth -= 1
        if char == ',' and depth == 0:
            parts.append(current)
            current = ''
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text):
    """Requirements of a label selector: `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
    `k notin (a,b)`, `k`, `!k`."""
    reqs = []
    for part in split_top_level(text or ''):
        if ' notin ' in part or ' in ' in part:
            op = 'notin' if ' notin ' in part else 'in'
            key, values = part.split(f' {op} ', 1)
            values = values.strip()
            if not (values.startswith('(') and values.endswith(')')):
                raise ApiError(400, 'BadRequest', f'invalid label selector: {part!r}')
            reqs.append((key.strip(), op, {v.strip() for v in values[1:-1].split(',')}))
        elif '!=' in part:
            key, value = part.split('!=', 1)
            reqs.append((key.strip(), '!=', value.strip()))
        elif '==' in part or '=' in part:
            key, value = part.split('==' if '==' in part else '=', 1)
            reqs.append((key.strip(), '=', value.strip()))
        elif part.startswith('!'):
            reqs.append((part[1:].strip(), '!exists', None))
        else:
            reqs.append((part, 'exists', None))
    return reqs


def labels_match(reqs, labels):
    for key, op, value in reqs:
        present = key in labels
        actual = labels.get(key)
        ok = {
            '=': present and actual == value,
            '!=': not present or actual != value,
            'in': present and actual in (value or ()),
            'notin': not present or actual not in (value or ()),
            'exists': present,
            '!exists': not present,
        }[op]
        if not ok:
            return False
    return True


def parse_field_selector(text):
    """Requirements of a field selector: `path=v`, `path==v`, `path!=v` on any dotted path
    (a real server allows only a few fields per kind; this one allows every field)."""
    reqs = []
    for part in split_top_level(text or ''):
        if '!=' in part:
            key, value = part.split('!=', 1)
            reqs.append((key.strip(), False, value.strip()))
        elif '=' in part:
            key, value = part.split('==' if '==' in part else '=', 1)
            reqs.append((key.strip(), True, value.strip()))
        else:
            raise ApiError(400, 'BadRequest', f'invalid field selector: {part!r}')
    return reqs


def field_value(obj, path):
    node = obj
    for key in path.split('.'):
        if not isinstance(node, dict):
            return ''
        node = node.get(key)
    if node is None:
        return ''
    if isinstance(node, bool):
        return 'true' if node else 'false'
    return str(node)


class Selector:
    def __init__(self, params, namespace=None, name=None):
        self.labels = parse_label_selector(params.get('labelSelector'))
        self.fields = parse_field_selector(params.get('fieldSelector'))
        self.namespace = namespace
        if name is not None:
            self.fields.append(('metadata.name', True, name))

    def matches(self, obj):
        meta = obj.get('metadata', {})
        if self.namespace is not None and meta.get('namespace') != self.namespace:
            return False
        if not labels_match(self.labels, meta.get('labels') or {}):
            return False
        return all((field_value(obj, path) == value) == equal for path, equal, value in self.fields)


# --- The store ------------------------------------------------------------------------------

class Watch:
    def __init__(self, resource, selector):
        self.resource = resource
        self.selector = selector
        self.queue = asyncio.Queue()


class Store:
    def __init__(self, service_cidr):
        self.resources = {}
        self.objects = {}  # resource key -> {(namespace, name): object}
        self.owners = {}  # (resource key, namespace, name) -> {path: manager}
        self.applied = {}  # (resource key, namespace, name) -> {manager: set of paths}
        self.rv = 0
        self.history = []  # (rv, resource key, type, object, previous object)
        self.compacted = 0  # watches from a resource version below this get 410 Gone
        self.watches = set()
        self.service_ips = ipaddress.ip_network(service_cidr).hosts()
        next(self.service_ips)  # .1 is the API server's own Service in a real cluster
        self.node_port = 30000
        for group, version, plural, kind, namespaced, status, short in BUILTIN_RESOURCES:
            self.add_resource(Resource(group, version, plural, kind, namespaced, status, short))
        for name in INITIAL_NAMESPACES:
            self.create(self.resources[('', 'v1', 'namespaces')], None,
                        {'metadata': {'name': name}}, 'kube-apiserver')

    def add_resource(self, res):
        self.resources[res.key] = res
        self.objects.setdefault(res.key, {})

    # Custom resources are served once their definition is stored, as in a real server.
    def register_crd(self, crd):
        spec = crd.get('spec', {})
        names = spec.get('names', {})
        for version in spec.get('versions', []):
            if not version.get('served', True):
                continue
            self.add_resource(Resource(
                spec['group'], version['name'], names['plural'], names['kind'],
                spec.get('scope') == 'Namespaced', 'status' in version.get('subresources', {}),
                names.get('shortNames', []), names.get('singular'), names.get('categories', [])))

    def unregister_crd(self, crd):
        spec = crd.get('spec', {})
        for version in spec.get('versions', []):
            key = (spec['group'], version['name'], spec['names']['plural'])
            self.resources.pop(key, None)
            self.objects.pop(key, None)

    def bump(self):
        self.rv += 1
        return str(self.rv)

    def record(self, res, kind, obj, previous=None):
        """Stores an event in the history and hands it to every watch of the resource."""
        event = (self.rv, res.key, kind, copy.deepcopy(obj), copy.deepcopy(previous))
        self.history.append(event)
        for watch in self.watches:
            if watch.resource.key == res.key:
                watch.queue.put_nowait(event)

    def list(self, res, selector):
        return [copy.deepcopy(o) for (_, _), o in sorted(self.objects[res.key].items())
                if selector.matches(o)]

    def get(self, res, namespace, name):
        obj = self.objects[res.key].get((namespace or '', name))
        if obj is None:
            raise not_found(res, name)
        return obj

    def prepare_new(self, res, namespace, body):
        obj = copy.deepcopy(body)
        if not isinstance(obj, dict):
            raise ApiError(400, 'BadRequest', 'the body is not a JSON object')
        meta = obj.setdefault('metadata', {})
        if not meta.get('name') and meta.get('generateName'):
            suffix = ''.join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta['name'] = meta['generateName'] + suffix
        if not meta.get('name'):
            raise ApiError(422, 'Invalid', f'{res.kind}: metadata.name: Required value: name or generateName is required')
        if res.namespaced:
            if meta.get('namespace') and namespace and meta['namespace'] != namespace:
                raise ApiError(400, 'BadRequest', 'the namespace of the provided object does not match the namespace sent on the request')
            meta['namespace'] = namespace or meta.get('namespace') or 'default'
        else:
            meta.pop('namespace', None)
        obj['apiVersion'] = res.api_version
        obj['kind'] = res.kind
        return obj

    def create(self, res, namespace, body, manager, applied=None):
        obj = self.prepare_new(res, namespace, body)
        meta = obj['metadata']
        key = (meta.get('namespace', ''), meta['name'])
        if key in self.objects[res.key]:
            raise ApiError(409, 'AlreadyExists', f'{res.qualified} "{meta["name"]}" already exists',
                           {'name': meta['name'], 'group': res.group, 'kind': res.plural})
        if res.status:
            obj.pop('status', None)
        for field in ('resourceVersion', 'deletionTimestamp', 'managedFields'):
            meta.pop(field, None)
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = now()
        meta['generation'] = 1
        self.default(res, obj)
        meta['resourceVersion'] = self.bump()
        self.objects[res.key][key] = obj
        okey = (res.key,) + key
        self.owners[okey] = {}
        self.applied[okey] = {}
        self.take_ownership(okey, {}, obj, manager, applied)
        if res.key == CRD_RESOURCE:
            self.register_crd(obj)
        self.record(res, 'ADDED', obj)
        return obj

    def default(self, res, obj):
        """The little defaulting the agent depends on: Services get a cluster IP (and node
        ports when their type needs them), like the real allocators give them."""
        if res.key != ('', 'v1', 'services'):
            return
        spec = obj.setdefault('spec', {})
        spec.setdefault('type', 'ClusterIP')
        if spec['type'] != 'ExternalName' and not spec.get('clusterIP'):
            ip = str(next(self.service_ips))
            spec['clusterIP'] = ip
            spec['clusterIPs'] = [ip]
        for port in spec.get('ports', []):
            port.setdefault('protocol', 'TCP')
            port.setdefault('targetPort', port.get('port'))
            if spec['type'] in ('NodePort', 'LoadBalancer') and not port.get('nodePort'):
                port['nodePort'] = self.node_port
                self.node_port += 1

    def take_ownership(self, okey, old, new, manager, applied):
        """Field ownership for server-side apply: an apply owns the fields it set; an update
        owns what it changed; a removed field loses its owner."""
        owners = self.owners[okey]
        old_leaves, new_leaves = leaves(old), leaves(new)
        for path in list(owners):
            if path not in new_leaves:
                del owners[path]
        if applied is not None:
            # Only what was stored: the status in an apply to the object is not.
            paths = set(leaves(applied)) & set(new_leaves)
            for path in paths:
                owners[path] = manager
            self.applied[okey][manager] = paths
        else:
            for path, value in new_leaves.items():
                if old_leaves.get(path, object()) != value:
                    owners[path] = manager

    def update(self, res, namespace, name, new, manager, subresource, applied=None, force=False):
        """Stores `new` as the next version of the object (replace, patch and apply end here).
        Writes to the main resource keep the old status and writes to /status keep everything
        else, for resources with a status subresource."""
        old = self.get(res, namespace, name)
        new = copy.deepcopy(new)
        if not isinstance(new, dict):
            raise ApiError(400, 'BadRequest', 'the body is not a JSON object')
        meta = new.setdefault('metadata', {})
        if meta.get('name', name) != name:
            raise ApiError(400, 'BadRequest', f'the name of the object ({meta["name"]}) does not match the name on the URL ({name})')
        sent_rv = meta.get('resourceVersion')
        if sent_rv and sent_rv != old['metadata']['resourceVersion']:
            raise ApiError(409, 'Conflict',
                           f'Operation cannot be fulfilled on {res.qualified} "{name}": the object has been modified; please apply your changes to the latest version and try again',
                           {'name': name, 'group': res.group, 'kind': res.plural})
        if res.status:
            if subresource == 'status':
                status = new.get('status')
                new = copy.deepcopy(old)
                if status is None:
                    new.pop('status', None)
                else:
                    new['status'] = status
            elif 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
            else:
                new.pop('status', None)
        meta = new.setdefault('metadata', {})
        for field in ('name', 'namespace', 'uid', 'creationTimestamp', 'deletionTimestamp', 'generation'):
            if field in old['metadata']:
                meta[field] = old['metadata'][field]
            else:
                meta.pop(field, None)
        meta.pop('managedFields', None)
        new['apiVersion'] = res.api_version
        new['kind'] = res.kind
        if res.key == ('', 'v1', 'services'):
            spec = new.setdefault('spec', {})
            for field in ('clusterIP', 'clusterIPs'):
                if field in old.get('spec', {}) and not spec.get(field):
                    spec[field] = old['spec'][field]
            self.default(res, new)
        okey = (res.key, namespace or '', name)
        if applied is not None and not force:
            owners = self.owners[okey]
            old_leaves = leaves(old)
            conflicts = [path for path, value in leaves(applied).items()
                         if owners.get(path, manager) != manager and old_leaves.get(path, value) != value]
            if conflicts:
                causes = [{'type': 'FieldManagerConflict', 'message': f'conflict with "{owners[p]}"',
                           'field': path_text(p)} for p in conflicts]
                raise ApiError(409, 'Conflict', f'Apply failed with {len(conflicts)} conflict(s): '
                               + ', '.join(f'conflict with "{owners[p]}": {path_text(p)}' for p in conflicts),
                               {'name': name, 'group': res.group, 'kind': res.plural, 'causes': causes})
        if strip_volatile(old) == strip_volatile(new):
            return copy.deepcopy(old)
        if spec_of(old) != spec_of(new):
            meta['generation'] = old['metadata'].get('generation', 1) + 1
        meta['resourceVersion'] = self.bump()
        self.take_ownership(okey, old, new, manager, applied)
        if meta.get('deletionTimestamp') and not meta.get('finalizers'):
            return self.remove(res, okey, new)
        self.objects[res.key][okey[1:]] = new
        if res.key == CRD_RESOURCE:
            self.register_crd(new)
        self.record(res, 'MODIFIED', new, old)
        return copy.deepcopy(new)

    def apply(self, res, namespace, name, body, manager, subresource, force):
        applied = copy.deepcopy(body)
        if not isinstance(applied, dict):
            raise ApiError(400, 'BadRequest', 'the applied configuration is not an object')
        meta = applied.setdefault('metadata', {})
        if meta.get('name', name) != name:
            raise ApiError(400, 'BadRequest', 'the name of the applied configuration does not match the URL')
        meta['name'] = name
        if (namespace or '', name) not in self.objects[res.key]:
            if subresource:
                raise not_found(res, name)
            return self.create(res, namespace, applied, manager, applied=applied)
        okey = (res.key, namespace or '', name)
        old = self.get(res, namespace, name)
        merged = deep_merge(old, applied)
        merged['metadata'].pop('resourceVersion', None)
        # Fields this manager applied before and leaves out now are removed, unless another
        # manager owns them too (this emulator keeps one owner per field: then they stay).
        still = set(leaves(applied))
        for path in self.applied[okey].get(manager, set()) - still:
            if self.owners[okey].get(path) == manager:
                remove_path(merged, path)
        if 'resourceVersion' in body.get('metadata', {}):
            merged['metadata']['resourceVersion'] = body['metadata']['resourceVersion']
        return self.update(res, namespace, name, merged, manager, subresource, applied=applied, force=force)

    def delete(self, res, namespace, name):
        obj = self.get(res, namespace, name)
        okey = (res.key, namespace or '', name)
        if obj['metadata'].get('finalizers'):
            if obj['metadata'].get('deletionTimestamp'):
                return copy.deepcopy(obj)
            old = copy.deepcopy(obj)
            obj['metadata']['deletionTimestamp'] = now()
            obj['metadata']['resourceVersion'] = self.bump()
            self.record(res, 'MODIFIED', obj, old)
            return copy.deepcopy(obj)
        obj = copy.deepcopy(obj)
        obj['metadata']['resourceVersion'] = self.bump()
        return self.remove(res, okey, obj)

    def remove(self, res, okey, obj):
        del self.objects[res.key][okey[1:]]
        self.owners.pop(okey, None)
        self.applied.pop(okey, None)
        if res.key == CRD_RESOURCE:
            self.unregister_crd(obj)
        self.record(res, 'DELETED', obj)
        return copy.deepcopy(obj)


def spec_of(obj):
    return {k: v for k, v in obj.items() if k not in ('metadata', 'status')}


def strip_volatile(obj):
    obj = copy.deepcopy(obj)
    obj.get('metadata', {}).pop('resourceVersion', None)
    return obj


# --- HTTP -----------------------------------------------------------------------------------

class Server:
    def __init__(self, store, log):
        self.store = store
        self.log = log
        self.stopping = asyncio.Event()

    async def handle(self, request):
        body = await request.read()
        self.log_request(request, body)
        try:
            return await self.route(request, body)
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)

    def log_request(self, request, body):
        entry = {
            'method': request.method,
            'path': request.path,
            'query': dict(request.query),
            'contentType': request.headers.get('Content-Type'),
            'body': body.decode('utf-8', 'replace'),
        }
        self.log.write(json.dumps(entry) + '\n')
        self.log.flush()

    async def route(self, request, body):
        path = request.path.rstrip('/') or '/'
        parts = path.strip('/').split('/') if path != '/' else []
        if path == '/version':
            return web.json_response({
                'major': '1', 'minor': '33', 'gitVersion': 'v1.33.0-clink-emulator',
                'platform': 'linux/amd64', 'goVersion': 'go1.24', 'compiler': 'gc',
                'gitCommit': '', 'gitTreeState': 'clean', 'buildDate': '2026-01-01T00:00:00Z',
            })
        if path == '/openapi/v2':
            # kubectl validates with this schema before it sends an object; an empty document
            # (a valid protobuf message) makes it skip validation of every kind.
            return web.Response(body=b'', content_type='application/octet-stream')
        if path in ('/healthz', '/readyz', '/livez'):
            return web.Response(text='ok')
        if path == '/api':
            return web.json_response({
                'kind': 'APIVersions', 'versions': ['v1'],
                'serverAddressByClientCIDRs': [{'clientCIDR': '0.0.0.0/0', 'serverAddress': request.host}],
            })
        if path == '/apis':
            return web.json_response({'kind': 'APIGroupList', 'apiVersion': 'v1',
                                      'groups': [self.group(g) for g in self.groups()]})
        if parts and parts[0] == 'apis' and len(parts) == 2:
            if parts[1] not in self.groups():
                raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
            return web.json_response(dict(self.group(parts[1]), kind='APIGroup', apiVersion='v1'))
        if parts[:1] == ['api'] and len(parts) >= 2:
            group, version, rest = '', parts[1], parts[2:]
        elif parts[:1] == ['apis'] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if not rest:
            return self.discovery(group, version)
        namespace = None
        if rest[0] == 'namespaces' and (len(rest) >= 4 or (len(rest) == 3 and rest[2] not in ('status', 'finalize'))):
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], rest[1] if len(rest) > 1 else None
        subresource = '/'.join(rest[2:]) or None
        res = self.store.resources.get((group, version, plural))
        if res is None or (namespace is not None and not res.namespaced):
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if subresource is not None and (subresource != 'status' or not res.status):
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        return await self.serve(request, body, res, namespace, name, subresource)

    def groups(self):
        return sorted({r.group for r in self.store.resources.values() if r.group})

    def group(self, name):
        versions = sorted({r.version for r in self.store.resources.values() if r.group == name})
        entries = [{'groupVersion': f'{name}/{v}', 'version': v} for v in versions]
        return {'name': name, 'versions': entries, 'preferredVersion': entries[0]}

    def discovery(self, group, version):
        resources = [r for r in self.store.resources.values() if (r.group, r.version) == (group, version)]
        if not resources:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        return web.json_response({
            'kind': 'APIResourceList', 'apiVersion': 'v1',
            'groupVersion': f'{group}/{version}' if group else version,
            'resources': [e for r in sorted(resources, key=lambda r: r.plural) for e in r.discovery()],
        })

    async def serve(self, request, body, res, namespace, name, subresource):
        store = self.store
        params = request.query
        method = request.method
        manager = params.get('fieldManager') or request.headers.get('User-Agent', 'unknown').split('/')[0]
        if method == 'GET' and params.get('watch') in ('true', '1'):
            return await self.watch(request, res, Selector(params, namespace, name))
        if name is None:
            if method == 'GET':
                return self.list(request, res, Selector(params, namespace))
            if method == 'POST':
                obj = store.create(res, namespace, parse_body(request, body), manager)
                return web.json_response(obj, status=201)
            if method == 'DELETE':
                deleted = [store.delete(res, o['metadata'].get('namespace'), o['metadata']['name'])
                           for o in store.list(res, Selector(params, namespace))]
                return web.json_response(self.list_of(res, deleted))
            raise ApiError(405, 'MethodNotAllowed', f'{method} is not supported on a collection')
        if res.namespaced and namespace is None:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if method == 'GET':
            return web.json_response(store.get(res, namespace, name))
        if method == 'PUT':
            return web.json_response(store.update(res, namespace, name, parse_body(request, body), manager, subresource))
        if method == 'DELETE':
            return web.json_response(store.delete(res, namespace, name))
        if method == 'PATCH':
            return web.json_response(self.patch(request, body, res, namespace, name, subresource, manager))
        raise ApiError(405, 'MethodNotAllowed', f'{method} is not supported')

    def patch(self, request, body, res, namespace, name, subresource, manager):
        store = self.store
        kind = request.content_type
        if kind == 'application/apply-patch+yaml':
            if not request.query.get('fieldManager'):
                raise ApiError(422, 'Invalid', 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch')
            force = request.query.get('force') in ('true', '1')
            return store.apply(res, namespace, name, parse_body(request, body), manager, subresource, force)
        old = store.get(res, namespace, name)
        patch = parse_body(request, body)
        if kind == 'application/merge-patch+json':
            new = merge_patch(old, patch)
        elif kind == 'application/strategic-merge-patch+json':
            new = strategic_merge_patch(old, patch)
        elif kind == 'application/json-patch+json':
            try:
                new = jsonpatch.apply_patch(old, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, 'Invalid', f'the JSON patch failed: {e}')
        else:
            raise ApiError(415, 'UnsupportedMediaType', f'the patch content type {kind!r} is not supported')
        # A patch is checked against the stored resource version only if it names one.
        patch_meta = patch.get('metadata') if isinstance(patch, dict) else None
        if not isinstance(patch_meta, dict) or 'resourceVersion' not in patch_meta:
            new.get('metadata', {}).pop('resourceVersion', None)
        return store.update(res, namespace, name, new, manager, subresource)

    def list_of(self, res, items):
        return {'kind': f'{res.kind}List', 'apiVersion': res.api_version,
                'metadata': {'resourceVersion': str(self.store.rv)}, 'items': items}

    def list(self, request, res, selector):
        items = self.store.list(res, selector)
        result = self.list_of(res, items)
        # Paging: the continue token is the offset of the next page and the resource version
        # of the first one, so every page describes the same list.
        limit = int(request.query.get('limit') or 0)
        offset, rv = 0, str(self.store.rv)
        if request.query.get('continue'):
            try:
                rv, offset = base64.urlsafe_b64decode(request.query['continue']).decode().split(':')
                offset = int(offset)
            except ValueError:
                raise ApiError(400, 'BadRequest', 'invalid continue token')
        if limit > 0 or offset:
            end = offset + limit if limit > 0 else len(items)
            result['items'] = items[offset:end]
            result['metadata']['resourceVersion'] = rv
            if end < len(items):
                token = base64.urlsafe_b64encode(f'{rv}:{end}'.encode()).decode()
                result['metadata']['continue'] = token
                result['metadata']['remainingItemCount'] = len(items) - end
        return web.json_response(result)

    async def watch(self, request, res, selector):
        store = self.store
        params = request.query
        rv = params.get('resourceVersion') or '0'
        try:
            since = int(rv)
        except ValueError:
            raise ApiError(400, 'BadRequest', f'invalid resourceVersion {rv!r}')
        timeout = float(params.get('timeoutSeconds') or 1800)
        bookmarks = params.get('allowWatchBookmarks') in ('true', '1')
        initial_events = params.get('sendInitialEvents') in ('true', '1')

        # Everything up to registering the watch happens without an await, so no event can
        # fall between what is replayed and what the queue receives.
        watch = Watch(res, selector)
        if since and since < store.compacted:
            initial = [{'type': 'ERROR', 'object': {
                'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                'message': f'too old resource version: {since} ({store.compacted})',
                'reason': 'Expired', 'code': 410}}]
            done = True
        else:
            done = False
            if since == 0 or initial_events:
                initial = [{'type': 'ADDED', 'object': o} for o in store.list(res, selector)]
                if initial_events:
                    initial.append(self.bookmark(res, {'k8s.io/initial-events-end': 'true'}))
            else:
                initial = [e for e in (self.event(watch, ev) for ev in store.history
                                       if ev[0] > since and ev[1] == res.key) if e]
            store.watches.add(watch)

        response = web.StreamResponse(headers={'Content-Type': 'application/json'})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for event in initial:
                await response.write(json.dumps(event).encode() + b'\n')
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not done and not self.stopping.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if bookmarks:
                        await response.write(json.dumps(self.bookmark(res)).encode() + b'\n')
                    break
                try:
                    item = await asyncio.wait_for(watch.queue.get(), remaining)
                except asyncio.TimeoutError:
                    continue
                if item is None:
                    break
                event = self.event(watch, item)
                if event:
                    await response.write(json.dumps(event).encode() + b'\n')
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            store.watches.discard(watch)
        return response

    def bookmark(self, res, annotations=None):
        meta = {'resourceVersion': str(self.store.rv)}
        if annotations:
            meta['annotations'] = annotations
        return {'type': 'BOOKMARK', 'object': {'kind': res.kind, 'apiVersion': res.api_version, 'metadata': meta}}

    @staticmethod
    def event(watch, item):
        """The event a watch sees for a change, as a real server sends it: an object that
        moves into the selection is ADDED, one that moves out is DELETED."""
        _, _, kind, obj, previous = item
        now_in = watch.selector.matches(obj)
        was_in = previous is not None and watch.selector.matches(previous)
        if kind == 'MODIFIED':
            kind = {(True, True): 'MODIFIED', (True, False): 'ADDED', (False, True): 'DELETED'}.get((now_in, was_in))
            if kind is None:
                return None
        elif not now_in:
            return None
        return {'type': kind, 'object': obj}

    async def compact(self, request):
        """Test hook: forget the history, so watches from older resource versions get 410."""
        self.store.history.clear()
        self.store.compacted = self.store.rv
        self.log_request(request, await request.read())
        return web.json_response({'compacted': self.store.rv})


def parse_body(request, body):
    if 'protobuf' in (request.content_type or ''):
        # Decoding protobuf needs every type's schema. kubectl's generators (`kubectl create
        # namespace|configmap|secret ...`) send it; `kubectl create -f`/`apply -f` send JSON.
        raise ApiError(415, 'UnsupportedMediaType',
                       'this API emulator reads JSON and YAML bodies, not protobuf: instead of '
                       '`kubectl create <kind> ...`, use `kubectl create -f` or `kubectl apply -f`')
    text = body.decode('utf-8', 'replace')
    if not text.strip():
        raise ApiError(400, 'BadRequest', 'the request has no body')
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ApiError(400, 'BadRequest', f'the body is neither JSON nor YAML: {e}')


def parse_listen(text):
    host, _, port = text.rpartition(':')
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f'expected HOST:PORT or [IPv6]:PORT, got {text!r}')
    return host.strip('[]'), int(port)


def load_crds(store, directory):
    crds = store.resources[CRD_RESOURCE]
    for path in sorted(pathlib.Path(directory).glob('*.yaml')):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get('kind') == 'CustomResourceDefinition':
                store.create(crds, None, doc, 'clink-emulator')


async def stop_with_parent(pid, stop):
    while pathlib.Path(f'/proc/{pid}').exists():
        await asyncio.sleep(1)
    stop.set()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--listen', type=parse_listen, required=True, help='HOST:PORT (port 0 picks one)')
    parser.add_argument('--ready-file', type=pathlib.Path, required=True,
                        help='written with the bound HOST:PORT once the server listens')
    parser.add_argument('--request-log', type=pathlib.Path, required=True,
                        help='every request is appended here as one JSON line')
    parser.add_argument('--crds', action='append', default=[], metavar='DIR',
                        help='serve the CustomResourceDefinitions of DIR/*.yaml from the start')
    parser.add_argument('--parent-pid', type=int, metavar='PID',
                        help='stop once process PID is gone (the test that started it)')
    parser.add_argument('--service-cidr', default='10.96.0.0/16',
                        help='where Services get their cluster IPs')
    args = parser.parse_args()

    store = Store(args.service_cidr)
    for directory in args.crds:
        load_crds(store, directory)
    with open(args.request_log, 'a', encoding='utf-8') as log:
        server = Server(store, log)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post('/_emulator/compact', server.compact)
        app.router.add_route('*', '/{tail:.*}', server.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        host, port = args.listen
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        bound = f'[{bound_host}]:{bound_port}' if ':' in bound_host else f'{bound_host}:{bound_port}'
        tmp = args.ready_file.with_suffix('.tmp')
        tmp.write_text(bound + '\n')
        tmp.rename(args.ready_file)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.parent_pid:
            orphaned = asyncio.create_task(stop_with_parent(args.parent_pid, stop))
        await stop.wait()
        server.stopping.set()
        for watch in list(store.watches):
            watch.queue.put_nowait(None)
        await runner.cleanup()


if __name__ == '__main__':
    asyncio.run(main())
    sys.exit(0)
