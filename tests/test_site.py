"""site.toml: the example's values, defaults, secrets, and problems with their line and column."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from generators.errors import ConfigError, Location, UsageError
from generators.model import DomainType
from generators.site import load_site
from tests.tools import ROOT

EXAMPLE_SITE = (ROOT / "site.toml").read_text()
MINIMAL_SITE = """\
domain = "lab.test"
[accounts]
admin_user = "admin"
[networks.lan]
subnet = "10.0.0.0/24"
bridge = "br0"
[hosts.h1]
uri = "qemu:///system"
ram_mb = 4096
cpus = 4
disk_gb = 100
[os.bookworm]
family = "debian"
suite = "bookworm"
kernel = "linux"
initrd = "initrd.gz"
[provision]
server = "10.0.0.2"
http_url = "http://10.0.0.2/"
interface = "eth0"
"""


# What [provision] upstream_dns takes, as its problems say.
UPSTREAM_RULE = ('["a.b.c.d", ...]: the name servers the provision server\'s dnsmasq forwards names outside the cluster'
                 " to, or [] for none")
# What [networks.*] dns takes, as its problems say.
DNS_RULE = ('["a.b.c.d", ...]: the name servers the VMs of this network are given, or [] for the provision'
            " server")


def _write(tmp_path: Path, text: str | bytes, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _problems(path: Path) -> list[str]:
    """Each problem as 'LINE:COL: message', the path left out."""
    with pytest.raises(ConfigError) as caught:
        load_site(path)
    return [str(problem).removeprefix(f"{path}:") for problem in caught.value.problems]


def test_upstream_dns_is_optional_and_may_be_empty(tmp_path: Path) -> None:
    """None: dnsmasq forwards to the server's resolv.conf; []: it forwards nothing (tests/test_dnsmasq.py)."""
    assert load_site(_write(tmp_path, MINIMAL_SITE)).provision.upstream_dns is None
    empty = load_site(_write(tmp_path, MINIMAL_SITE + "upstream_dns = []\n")).provision.upstream_dns
    assert empty == ()
    assert load_site(ROOT / "site.toml").provision.upstream_dns == (IPv4Address("192.168.50.1"),)


def test_the_example_site_toml_parses() -> None:
    site = load_site(ROOT / "site.toml")
    assert site.domain == "phys.example.org" and site.domain_type is DomainType.KVM
    assert sorted(site.networks) == ["dmz", "lan"] and sorted(site.hosts) == ["kvm0", "kvm1"]
    lan = site.networks["lan"]
    assert lan.subnet == IPv4Network("192.168.50.0/24") and lan.gateway == IPv4Address("192.168.50.1")
    assert lan.dhcp_ranges == ((IPv4Address("192.168.50.200"), IPv4Address("192.168.50.250")),)
    assert site.networks["dmz"].vlan == 60
    assert site.hosts["kvm0"].cpu_overcommit == 4.0 and site.hosts["kvm1"].ram_overcommit == 1.0
    assert site.oses["bookworm"].cloud_image is not None
    assert site.provision.vm == "provision" and site.provision.server is None  # resolved by validate.py
    assert site.hostgroups is not None and site.hostgroups["compute"] == "Compute nodes"


def test_defaults_of_a_minimal_site(tmp_path: Path) -> None:
    site = load_site(_write(tmp_path, MINIMAL_SITE))
    assert (site.domain_type, site.locale, site.keyboard, site.timezone) == (DomainType.KVM, "en_US.UTF-8", "us", "UTC")
    assert (site.default_network, site.default_os) == ("lan", "bookworm")
    assert site.provision.http_url == "http://10.0.0.2"  # trailing slash dropped: URLs are joined with "/"
    assert (site.provision.tftp_root, site.provision.config_dir) == ("/srv/tftp", "/etc/kvmconf")
    assert site.hosts["h1"].disk_dir == "/var/lib/libvirt/images" and site.hosts["h1"].cpu_overcommit == 1.0
    assert (site.backup.keep, site.backup.full_every) == (1, 7)
    assert site.accounts.root_password_hash == "!" and site.hostgroups is None


def test_secrets_file_overrides_accounts(tmp_path: Path) -> None:
    hash_ = "$6$salt$" + "a" * 86
    _write(tmp_path, f'[accounts]\nroot_password_hash = "{hash_}"\n', "secrets.toml")
    site = load_site(_write(tmp_path, MINIMAL_SITE.replace('admin_user = "admin"',
                                                           'admin_user = "admin"\nsecrets = "secrets.toml"')))
    assert site.accounts.root_password_hash == hash_ and site.accounts.admin_password_hash == "!"


def test_a_missing_secrets_file_keeps_site_values(tmp_path: Path) -> None:
    site = load_site(_write(tmp_path, MINIMAL_SITE.replace('admin_user = "admin"',
                                                           'admin_user = "admin"\nsecrets = "nothere.toml"')))
    assert site.accounts.root_password_hash == "!"


TABLES = ["", "accounts", "networks.lan", "hosts.kvm0", "os.bookworm", "provision", "backup"]


@pytest.mark.parametrize("table", TABLES)
def test_unknown_key_in_every_table(table: str, tmp_path: Path) -> None:
    header = f"[{table}]\n" if table else 'domain = "phys.example.org"\n'
    line = EXAMPLE_SITE[:EXAMPLE_SITE.index(header)].count("\n") + 2
    text = EXAMPLE_SITE.replace(header, f"{header}    colour = 1\n", 1)
    name = f"{table}.colour" if table else "colour"
    [problem] = _problems(_write(tmp_path, text))
    assert re.fullmatch(rf"{line}:5: key '{re.escape(name)}': unknown key \(expected one of: [a-z_, ]+\)", problem)


def test_unknown_table(tmp_path: Path) -> None:
    assert _problems(_write(tmp_path, EXAMPLE_SITE + "[mail]\nrelay = 'x'\n")) == [
        "102:1: key 'mail': unknown key (expected one of: accounts, backup, default_network, default_os, domain,"
        " domain_type, hostgroups, hosts, keyboard, locale, networks, os, provision, timezone)"]


# (old text, new text, expected 'LINE:COL: message' list)
WRONG_VALUES = [
    ('domain = "phys.example.org"', "domain = 5",
     ["3:1: key 'domain': 5 is an integer (expected a DNS domain such as cluster.lan)"]),
    # DNS: labels of at most 63 characters, names of at most 253; the zones also name hostmaster.<domain>.
    ('domain = "phys.example.org"', f'domain = "{"a" * 64}.org"',
     [f"3:1: key 'domain': '{'a' * 55}...' (68 characters) has a label of 64 characters (expected labels of at most 63"
      " characters between the dots)"]),
    ('domain = "phys.example.org"', f'domain = "{".".join(["a" * 63] * 4)}"',
     [f"3:1: key 'domain': '{'a' * 55}...' (255 characters) is too long for DNS (expected at most 242 characters, so"
      " that the zones' hostmaster.<domain> fits DNS's 253)"]),
    ('domain_type = "kvm"', 'domain_type = "xen"',
     ["4:1: key 'domain_type': 'xen' is not a domain type (expected kvm or qemu)"]),
    ('default_network = "lan"', 'default_network = "wan"',
     ["8:1: key 'default_network': 'wan' is not a network (expected one of: dmz, lan)"]),
    ('default_network = "lan"', 'default_network = ""',
     ["8:1: key 'default_network': '' is not a network (expected one of: dmz, lan)"]),
    ('default_os = "bookworm"', 'default_os = ""',
     ["9:1: key 'default_os': '' is not an OS (expected one of: bookworm)"]),
    ('admin_user = "admin"', 'admin_user = "Admin"',
     ["12:1: key 'accounts.admin_user': 'Admin' is not a user name (expected up to 32 lowercase letters, digits, '_',"
      " '-', not starting with a digit or '-')"]),
    # ssh <vm> logs in as ssh_user through the generated ssh config: a space there broke every ssh command.
    ('admin_user = "admin"', 'admin_user = "admin"\nssh_user = "ad min"',
     ["13:1: key 'accounts.ssh_user': 'ad min' is not a user name (expected up to 32 lowercase letters, digits, '_',"
      " '-', not starting with a digit or '-')"]),
    ('root_password_hash = "!"', 'root_password_hash = "secret"',
     ["14:1: key 'accounts.root_password_hash': is not a crypt(3) hash (expected a SHA-512 '$6$...' or yescrypt"
      " '$y$...' hash, e.g. from mkpasswd -m sha-512, or '!' for a locked account; plain text is refused)"]),
    ('ssh_keys = ["ssh-ed25519', 'ssh_keys = ["ssh-dss AAAA", "ssh-ed25519',
     ["16:1: key 'accounts.ssh_keys': 'ssh-dss AAAA' is not an SSH public key (expected 'ssh-ed25519 AAAA..."
      " comment')"]),
    ('bridge = "br0"', 'bridge = "a-very-long-bridge-name"',
     ["24:1: key 'networks.lan.bridge': 'a-very-long-bridge-name' is not an interface name (expected at most 15"
      " letters, digits, '-', '_', '.')"]),
    # Linux refuses ':' in interface names, and cluster.conf's nic= could not name one: the message's own list
    ('bridge = "br0"', 'bridge = "br:0"',
     ["24:1: key 'networks.lan.bridge': 'br:0' is not an interface name (expected at most 15 letters, digits, '-',"
      " '_', '.')"]),
    ('gateway = "192.168.50.1"', 'gateway = "192.168.51.1"',
     ["23:1: key 'networks.lan.gateway': '192.168.51.1' is outside subnet 192.168.50.0/24 (expected an address in"
      " it)"]),
    ('gateway = "192.168.60.1"', 'gateway = "192.168.60.0"',
     ["32:1: key 'networks.dmz.gateway': '192.168.60.0' is the network address of subnet 192.168.60.0/24 (expected a"
      " host address in it)"]),
    ('gateway = "192.168.50.1"', 'gateway = "192.168.50.255"',
     ["23:1: key 'networks.lan.gateway': '192.168.50.255' is the broadcast address of subnet 192.168.50.0/24"
      " (expected a host address in it)"]),
    # Overlapping networks would share reverse zones and DHCP ranges: the later one is refused.
    ('subnet = "192.168.60.0/24"\ngateway = "192.168.60.1"', 'subnet = "192.168.50.128/25"\ngateway = "192.168.50.129"',
     ["31:1: key 'networks.dmz.subnet': '192.168.50.128/25' overlaps network 'lan' (192.168.50.0/24) (expected a subnet"
      " that shares no address with another network's)"]),
    ('subnet = "192.168.60.0/24"\ngateway = "192.168.60.1"', 'subnet = "192.168.0.0/16"\ngateway = "192.168.60.1"',
     ["31:1: key 'networks.dmz.subnet': '192.168.0.0/16' overlaps network 'lan' (192.168.50.0/24) (expected a subnet"
      " that shares no address with another network's)"]),
    # [networks.*] dns becomes DHCP's dns-server option and the static installs' nameservers: the bad entry is named.
    ('bridge = "br0"\ndns = ["192.168.50.2"]', 'bridge = "br0"\ndns = ["ns1"]',
     [f"25:1: key 'networks.lan.dns': ['ns1'] is not a list of IPv4 addresses (expected {DNS_RULE}; 'ns1' is not an"
      " IPv4 address)"]),
    ('bridge = "br0"\ndns = ["192.168.50.2"]', 'bridge = "br0"\ndns = [3232248322]',
     [f"25:1: key 'networks.lan.dns': [3232248322] is not a list of IPv4 addresses (expected {DNS_RULE}; 3232248322"
      " is not an IPv4 address)"]),
    ('dhcp_ranges = ["192.168.50.200-192.168.50.250"]', 'dhcp_ranges = ["192.168.50.250-192.168.50.200"]',
     ["26:1: key 'networks.lan.dhcp_ranges': ['192.168.50.250-192.168.50.200'] is not a list of DHCP ranges"
      " ('192.168.50.250-192.168.50.200' ends before it starts; expected FIRST-LAST with FIRST <= LAST)"]),
    ('dhcp_ranges = ["192.168.50.200-192.168.50.250"]', 'dhcp_ranges = ["192.168.9.200-192.168.9.250"]',
     ["26:1: key 'networks.lan.dhcp_ranges': '192.168.9.200-192.168.9.250' is outside subnet 192.168.50.0/24"
      " (expected a range in it)"]),
    ("vlan = 60", "vlan = 4095", ["34:1: key 'networks.dmz.vlan': 4095 is not a VLAN id (expected 1-4094)"]),
    ("vlan = 60", "vlan = true", ["34:1: key 'networks.dmz.vlan': True is a boolean (expected a VLAN id (1-4094))"]),
    ('uri = "qemu:///system"', 'uri = "kvm0"',
     ["39:1: key 'hosts.kvm0.uri': 'kvm0' is not a libvirt URI (expected e.g. qemu:///system or"
      " qemu+ssh://root@HOST/system)"]),
    ("cpus = 32", "cpus = 0", ["41:1: key 'hosts.kvm0.cpus': 0 is out of range (expected a positive integer)"]),
    # TOML integers reach 2**63: such a count is a typo, and it overflowed the capacity sums into floats.
    ("cpus = 32", "cpus = 99999999999999999999",
     ["41:1: key 'hosts.kvm0.cpus': 99999999999999999999 is out of range (expected a positive integer, at most 8192)"]),
    ("cpus = 32", "cpus = 8193", ["41:1: key 'hosts.kvm0.cpus': 8193 is out of range (expected a positive integer,"
                                  " at most 8192)"]),
    ("keep = 2", "keep = 2147483648", ["89:1: key 'backup.keep': 2147483648 is out of range (expected a positive"
                                       " integer, at most 2147483647)"]),
    ("cpu_overcommit = 4.0", "ram_overcommit = -inf",
     ["45:1: key 'hosts.kvm0.ram_overcommit': -inf is out of range (expected a positive number)"]),
    # The address reaches Nagios's check_by_ssh -H and ssh: nothing but an IP address or a DNS name.
    ('address = "192.168.50.4"', 'address = "kvm0; reboot"',
     ["44:1: key 'hosts.kvm0.address': 'kvm0; reboot' is not an IP address or DNS name (expected e.g. 192.168.1.4"
      " or kvm0.example.org)"]),
    ('address = "192.168.50.4"', 'address = ""',
     ["44:1: key 'hosts.kvm0.address': '' is not an IP address or DNS name (expected e.g. 192.168.1.4 or"
      " kvm0.example.org)"]),
    ('family = "debian"', 'family = "arch"',
     ["68:1: key 'os.bookworm.family': 'arch' is not an OS family (expected debian or ubuntu)"]),
    # pxelinux's KERNEL/INITRD and GRUB's linux/initrd lines end a path at whitespace.
    ('kernel = "debian-installer/amd64/linux"', 'kernel = "debian installer/amd64/linux"',
     ["70:1: key 'os.bookworm.kernel': 'debian installer/amd64/linux' is not a TFTP path the boot loaders can load"
      " (expected the installer kernel's path under the TFTP root, without spaces)"]),
    # An empty kernel left the boot entries with a bare `KERNEL`; '..' is refused by dnsmasq's TFTP, and
    # `invoke provision-server` would copy the file to that path, outside tftp_root.
    ('kernel = "debian-installer/amd64/linux"', 'kernel = ""',
     ["70:1: key 'os.bookworm.kernel': is empty (expected the installer kernel's path under the TFTP root: an OS of"
      " family debian installs over PXE with it)"]),
    ('initrd = "debian-installer/amd64/initrd.gz"', 'initrd = "debian-installer/../../initrd.gz"',
     ["71:1: key 'os.bookworm.initrd': 'debian-installer/../../initrd.gz' leads out of the TFTP root (expected the"
      " installer initrd's path under the TFTP root, without '..')"]),
    ('initrd = "debian-installer/amd64/initrd.gz"', 'initrd = "debian-installer/amd64/initrd.gz\\t"',
     ["71:1: key 'os.bookworm.initrd': 'debian-installer/amd64/initrd.gz\\t' holds the control character '\\t'"
      " (expected text on one line, without control characters such as newline or tab)"]),
    # dnsmasq's interface= and the provision server's own check need an interface name.
    ('interface = "enp1s0"', 'interface = ""',
     ["79:1: key 'provision.interface': '' is not an interface name (expected at most 15 letters, digits, '-', '_',"
      " '.')"]),
    ('http_url = "http://192.168.50.2"', 'http_url = "ftp://192.168.50.2"',
     ["77:1: key 'provision.http_url': 'ftp://192.168.50.2' is not a URL the provision server can serve (expected"
      " http://host[:port][/path], e.g. http://192.168.1.2: it serves plain HTTP)"]),
    ('http_url = "http://192.168.50.2"', 'http_url = "https://192.168.50.2"',
     ["77:1: key 'provision.http_url': 'https://192.168.50.2' is not a URL the provision server can serve (expected"
      " http://host[:port][/path], e.g. http://192.168.1.2: it serves plain HTTP)"]),
    ('http_url = "http://192.168.50.2"', 'http_url = "http://192.168.50.2:99999"',
     ["77:1: key 'provision.http_url': 'http://192.168.50.2:99999' is not a URL the provision server can serve"
      " (expected http://host[:port][/path], e.g. http://192.168.1.2: it serves plain HTTP)"]),
    # The kernel would cut the preseed's URL off the installer's command line.
    ('http_url = "http://192.168.50.2"', f'http_url = "http://192.168.50.2/{"a" * 1005}"',
     [f"77:1: key 'provision.http_url': 'http://192.168.50.2/{'a' * 35}...' (1025 characters) is too long for the"
      " installer's kernel command line (expected at most 1024 characters, which leaves room for the VM's name and"
      " domain in its 2048)"]),
    ('http_url = "http://192.168.50.2"', 'http_url = "http://192.168.50.2/?x=1"',
     ["77:1: key 'provision.http_url': 'http://192.168.50.2/?x=1' is not a URL the provision server can serve (expected"
      " http://host[:port][/path], e.g. http://192.168.1.2: it serves plain HTTP)"]),
    # [provision] upstream_dns becomes dnsmasq's server= lines: IPv4 addresses only, and the bad entry is named.
    ('upstream_dns = ["192.168.50.1"]', 'upstream_dns = ["192.168.50.1", ""]',
     ["84:1: key 'provision.upstream_dns': ['192.168.50.1', ''] is not a list of name server addresses (expected"
      f" {UPSTREAM_RULE}; '' is not an IPv4 address)"]),
    ('upstream_dns = ["192.168.50.1"]', 'upstream_dns = ["ns1.example.org"]',
     ["84:1: key 'provision.upstream_dns': ['ns1.example.org'] is not a list of name server addresses (expected"
      f" {UPSTREAM_RULE}; 'ns1.example.org' is not an IPv4 address)"]),
    ('upstream_dns = ["192.168.50.1"]', 'upstream_dns = [3232248321]',  # IPv4Address(3232248321) is 192.168.50.1
     ["84:1: key 'provision.upstream_dns': [3232248321] is not a list of name server addresses (expected"
      f" {UPSTREAM_RULE}; 3232248321 is not an IPv4 address)"]),
    ('upstream_dns = ["192.168.50.1"]', 'upstream_dns = ["127.0.0.53"]',  # dnsmasq listens on lo itself
     ["84:1: key 'provision.upstream_dns': ['127.0.0.53'] is not a list of name server addresses (expected"
      f" {UPSTREAM_RULE}; '127.0.0.53' is a loopback address, where the provision server's dnsmasq itself listens)"]),
    ('upstream_dns = ["192.168.50.1"]', 'upstream_dns = "192.168.50.1"',
     ["84:1: key 'provision.upstream_dns': '192.168.50.1' is a string (expected a list of name server addresses)"]),
    ('interface = "enp1s0"', 'interface = "enp1s0"\nserver = "192.168.50.2"',
     ["74:1: table '[provision]' needs exactly one of 'vm' (the provision VM's name in cluster.conf) or 'server'"
      " (its IPv4 address)"]),
    ('schedule = "30 2 * * *"', 'schedule = "daily"',
     ["86:1: key 'backup.schedule': 'daily' is not a cron schedule (expected 5 fields, e.g. '30 2 * * *')"]),
    ("full_every = 7", "full_every = 1.5", ["90:1: key 'backup.full_every': 1.5 is a number (expected a positive"
                                            " integer)"]),
    ('compute = "Compute nodes"', 'compute = 5\n"bad group" = "x"',
     ["101:1: key 'hostgroups.compute': 5 is an integer (expected a string: the hostgroup's description)",
      "102:1: key 'hostgroups.bad group': is not a hostgroup name (expected letters, digits, '_', '.' and '-',"
      " starting with a letter or digit)"]),
    # Table names reach Nagios command lines, cron and virsh: only what cluster.conf's host=, net=, os= can name.
    ("[hosts.kvm1]\n", '[hosts."kvm1;x"]\n',
     ["59:1: key 'hosts.kvm1;x': is not a name cluster.conf's host= can take (expected letters, digits, '_', '.' and"
      " '-', starting with a letter or digit)"]),
    ("[networks.dmz]\n", '[networks."dmz x"]\n',
     ["30:1: key 'networks.dmz x': is not a name cluster.conf's net= can take (expected letters, digits, '_', '.' and"
      " '-', starting with a letter or digit)"]),
    ("[os.bookworm]\n", '[os."-bookworm"]\n',
     ["9:1: key 'default_os': 'bookworm' is not an OS (expected one of: -bookworm)",
      "67:1: key 'os.-bookworm': is not a name cluster.conf's os= can take (expected letters, digits, '_', '.' and"
      " '-', starting with a letter or digit)"]),
    ("[hosts.kvm1]\n", "[hosts.auto]\n",
     ["59:1: key 'hosts.auto': is host=auto's word for automatic placement (expected another host name)"]),
    ("[hosts.kvm1]\n", "[hosts]\nkvm9 = 5\n[hosts.kvm1]\n",
     ["60:1: key 'hosts.kvm9': 5 is an integer (expected a table [hosts.kvm9] with uri, ram_mb, cpus, disk_gb,"
      " ...)"]),
    ('default_os = "bookworm"', 'default_os = "bookworm"\nnetworks = {}',
     ["22:14: not valid TOML: Cannot declare ('networks', 'lan') twice"]),
]


@pytest.mark.parametrize(("old", "new", "expected"), WRONG_VALUES, ids=[new for _, new, _ in WRONG_VALUES])
def test_wrong_values(old: str, new: str, expected: list[str], tmp_path: Path) -> None:
    assert EXAMPLE_SITE.count(old) == 1
    assert _problems(_write(tmp_path, EXAMPLE_SITE.replace(old, new))) == expected


# Both lists of name servers are read by one parser: each key refuses the same entries, naming the first bad one.
NAME_SERVER_KEYS = [
    ('dns = ["192.168.50.2"]\ndhcp', "dns = {}\ndhcp", "25:1: key 'networks.lan.dns'", "IPv4 addresses", DNS_RULE,
     "where each VM would ask itself"),
    ('upstream_dns = ["192.168.50.1"]', "upstream_dns = {}", "84:1: key 'provision.upstream_dns'",
     "name server addresses", UPSTREAM_RULE, "where the provision server's dnsmasq itself listens"),
]
BAD_NAME_SERVERS = [
    ('["192.168.50.1", "ns1"]', "'ns1' is not an IPv4 address"),
    ('["192.168.50.1, 192.168.50.3"]', "'192.168.50.1, 192.168.50.3' is not an IPv4 address"),  # one string, not two
    ('["192.168.50.1 "]', "'192.168.50.1 ' is not an IPv4 address"),
    ('[true]', "True is not an IPv4 address"),
    # A VM given 127.0.0.1 asks itself, and its installer (no resolver of its own) resolves nothing.
    ('["127.0.0.1"]', "'127.0.0.1' is a loopback address, {loopback}"),
    # Written as they are into preseed's netcfg/get_nameservers, cloud-init's nameservers and dnsmasq's server=.
    ('["0.0.0.0"]', "'0.0.0.0' is not the unicast address of a name server"),
    ('["224.0.0.251"]', "'224.0.0.251' is not the unicast address of a name server"),
    ('["255.255.255.255"]', "'255.255.255.255' is not the unicast address of a name server"),
]


@pytest.mark.parametrize(("old", "new", "where", "what", "rule", "loopback"), NAME_SERVER_KEYS,
                         ids=["networks.dns", "upstream_dns"])
@pytest.mark.parametrize(("value", "reason"), BAD_NAME_SERVERS, ids=[value for value, _ in BAD_NAME_SERVERS])
def test_lists_of_name_servers_refuse_the_same_entries(old: str, new: str, where: str, what: str, rule: str,
                                                      loopback: str, value: str, reason: str, tmp_path: Path) -> None:
    assert EXAMPLE_SITE.count(old) == 1
    text = EXAMPLE_SITE.replace(old, new.format(value))
    shown = repr(tomllib.loads(text)["networks"]["lan"]["dns"] if "networks" in where else
                 tomllib.loads(text)["provision"]["upstream_dns"])
    assert _problems(_write(tmp_path, text)) == [
        f"{where}: {shown} is not a list of {what} (expected {rule}; {reason.format(loopback=loopback)})"]


def test_lists_of_name_servers_keep_their_addresses_in_order(tmp_path: Path) -> None:
    text = EXAMPLE_SITE.replace('dns = ["192.168.50.2"]\ndhcp', 'dns = ["192.168.50.2", "10.0.0.53"]\ndhcp')
    text = text.replace('upstream_dns = ["192.168.50.1"]', 'upstream_dns = ["192.168.50.1", "9.9.9.9"]')
    site = load_site(_write(tmp_path, text))
    assert site.networks["lan"].dns_servers == (IPv4Address("192.168.50.2"), IPv4Address("10.0.0.53"))
    assert site.provision.upstream_dns == (IPv4Address("192.168.50.1"), IPv4Address("9.9.9.9"))


def test_the_longest_domain_is_242_characters(tmp_path: Path) -> None:
    longest = ".".join(["a" * 63] * 3 + ["b" * 50])
    assert len(longest) == 242
    assert load_site(_write(tmp_path, MINIMAL_SITE.replace("lab.test", longest))).domain == longest
    assert _problems(_write(tmp_path, MINIMAL_SITE.replace("lab.test", longest + "b"))) == [
        f"1:1: key 'domain': '{'a' * 55}...' (243 characters) is too long for DNS (expected at most 242 characters,"
        " so that the zones' hostmaster.<domain> fits DNS's 253)"]


def test_only_debian_needs_installer_paths(tmp_path: Path) -> None:
    """install=pxe boots Debian's installer only; an Ubuntu release installs from its cloud image."""
    jammy = '[os.jammy]\nfamily = "ubuntu"\nsuite = "jammy"\ncloud_image = "/img/jammy.qcow2"\n'
    site = load_site(_write(tmp_path, EXAMPLE_SITE + jammy))
    assert (site.oses["jammy"].kernel, site.oses["jammy"].initrd) == ("", "")
    bookworm_kernel = 'kernel = "debian-installer/amd64/linux"\n'
    assert EXAMPLE_SITE.count(bookworm_kernel) == 1
    assert _problems(_write(tmp_path, EXAMPLE_SITE.replace(bookworm_kernel, ""))) == [
        "67:1: key 'os.bookworm.kernel' is missing (expected the installer kernel's path under the TFTP root)"]


def test_empty_tables_of_tables(tmp_path: Path) -> None:
    text = MINIMAL_SITE.replace('[hosts.h1]\nuri = "qemu:///system"\nram_mb = 4096\ncpus = 4\ndisk_gb = 100\n',
                                "[hosts]\n")
    assert _problems(_write(tmp_path, text)) == [
        "7:1: key 'hosts': has no entries (expected at least one [hosts.NAME] table with uri, ram_mb, cpus, disk_gb,"
        " ...)"]


def test_missing_keys_point_at_their_table(tmp_path: Path) -> None:
    text = MINIMAL_SITE.replace("ram_mb = 4096\n", "").replace('domain = "lab.test"\n', "")
    assert _problems(_write(tmp_path, text)) == [
        "1:1: key 'domain' is missing (expected a DNS domain such as cluster.lan)",
        "6:1: key 'hosts.h1.ram_mb' is missing (expected a positive integer)"]


def test_a_missing_table_is_one_problem_not_one_per_key(tmp_path: Path) -> None:
    text = MINIMAL_SITE[:MINIMAL_SITE.index("[provision]")]
    assert _problems(_write(tmp_path, text)) == ["1:1: table '[provision]' is missing"]


def test_keys_are_located_in_spaced_headers_and_dotted_tables(tmp_path: Path) -> None:
    text = MINIMAL_SITE.replace("[hosts.h1]", '[ hosts . "h1" ]').replace("cpus = 4", "  'cpus' = 0")
    text += '[os.jammy]\nfamily = "ubuntu"\nsuite = "jammy"\nkernel = "k"\ninitrd = "i"\nnested.key = 1\n'
    assert _problems(_write(tmp_path, text)) == [
        "10:3: key 'hosts.h1.cpus': 0 is out of range (expected a positive integer)",
        "21:1: key 'os.jammy.nested': unknown key (expected one of: cloud_image, family, initrd, kernel, suite)"]


def test_inline_tables_fall_back_to_the_enclosing_header(tmp_path: Path) -> None:
    text = MINIMAL_SITE.replace('[networks.lan]\nsubnet = "10.0.0.0/24"\nbridge = "br0"\n',
                                '[networks]\nlan = { subnet = "10.0.0.0/33", bridge = "br0" }\n')
    assert _problems(_write(tmp_path, text)) == [
        "4:1: key 'networks.lan.subnet': '10.0.0.0/33' is not an IPv4 network (expected a.b.c.d/nn)"]


def test_toml_error_at_end_of_document(tmp_path: Path) -> None:
    assert _problems(_write(tmp_path, MINIMAL_SITE + "x = [1,\n")) == [
        "22:1: not valid TOML: Invalid value"]


def test_missing_site_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"nothere\.toml: no such file \(give the site settings with --site"):
        load_site(tmp_path / "nothere.toml")


def test_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r": is a directory, not a TOML file"):
        load_site(tmp_path)


# Every value kind TOML has, in every key of the example: never anything but a ConfigError.
ANY_VALUES = ["0", "-7", "1.5", "nan", "true", '""', '"x y"', "[]", "[1, 2]", '["a", "b"]', "[[]]", "{}",
              "{ a = 1 }", "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", '"192.168.50.7"', '"10.0.0.0/8"',
              '["1.2.3.4-1.2.3.1"]', '["1.2.3.4-x"]', '["a-b-c"]', "9" * 30]
KEY_LINES = [number for number, line in enumerate(EXAMPLE_SITE.split("\n"))
             if re.match(r"[a-z_-]+ = ", line)]


@pytest.mark.parametrize("number", KEY_LINES)
def test_any_value_in_any_key_is_a_config_error_at_worst(number: int, tmp_path: Path) -> None:
    lines = EXAMPLE_SITE.split("\n")
    key = lines[number].split(" = ")[0]
    path = tmp_path / "site.toml"
    for value in ANY_VALUES:
        lines[number] = f"{key} = {value}"
        path.write_text("\n".join(lines))
        try:
            load_site(path)
        except ConfigError as err:
            for problem in err.problems:
                assert re.match(rf"{re.escape(str(path))}:[1-9]\d*:[1-9]\d*: \S", str(problem)), problem


# --- where other machines reach a physical host over SSH (the Nagios backup check's -H) --------------------------

@pytest.mark.parametrize(("uri", "address", "expected"), [
    ("qemu+ssh://root@kvm1.phys.example.org/system", "192.168.50.5", "192.168.50.5"),  # the address wins
    ("qemu+ssh://root@kvm1.phys.example.org/system", None, "kvm1.phys.example.org"),
    ("qemu+ssh://admin@KVM2.example.org:2222/system", None, "kvm2.example.org"),  # no user@, no :port; lowercase
    ("qemu+tls://[fd00::5]:16514/system", None, "fd00::5"),
    ("qemu:///system", "kvm0.mgmt.example.net", "kvm0.mgmt.example.net"),
    ("qemu:///system", None, None),  # a local URI names no host
    ("qemu+unix:///system?socket=/run/lab/libvirt-sock", None, None),
    ("test:///default", None, None),
    ("qemu+ssh://root@localhost/system", None, None),  # loopback: whichever machine uses the URI
    ("qemu+ssh://root@127.0.0.1:2222/system", None, None),
    ("qemu+ssh://[fd00::5/system", None, None),  # an unbalanced '[': no host (libvirt refuses such a URI too)
])
def test_ssh_address_is_the_address_else_a_remote_uris_host(uri: str, address: str | None, expected: str | None,
                                                            tmp_path: Path) -> None:
    line = f'uri = "{uri}"' + (f'\naddress = "{address}"' if address else "")
    path = _write(tmp_path, MINIMAL_SITE.replace('uri = "qemu:///system"', line))
    host = load_site(path).hosts["h1"]
    assert (host.uri, host.address, host.ssh_address) == (uri, address, expected)
    assert host.where == Location(str(path), 7, 1)  # its [hosts.h1] table, for problems found later
    # and its keys that are set, for a problem with one of them (the Nagios check's address)
    assert host.where_key == {"uri": Location(str(path), 8, 1)} | ({"address": Location(str(path), 9, 1)}
                                                                  if address else {})


@pytest.mark.parametrize("uri", ["qemu+ssh://root@kvm_1/system", "qemu+ssh://root@kvm1$(reboot)/system"])
@pytest.mark.parametrize("address", ["192.168.50.5", None])
def test_a_uris_host_need_not_be_a_dns_name(uri: str, address: str | None, tmp_path: Path) -> None:
    # libvirt connects through ssh, which takes an ssh config alias (kvm_1) there; only the Nagios backup check,
    # where the URI's host stands in for a missing address, needs an IP address or DNS name (tested there).
    line = f'uri = "{uri}"' + (f'\naddress = "{address}"' if address else "")
    host = load_site(_write(tmp_path, MINIMAL_SITE.replace('uri = "qemu:///system"', line))).hosts["h1"]
    assert (host.uri, host.address) == (uri, address)


@pytest.mark.parametrize(("kvm0_address", "kvm1_address"), [
    ("192.168.50.4", "192.168.50.4"),
    ("kvm0.phys.example.org", "KVM0.Phys.example.org"),  # a name: compared as DNS compares names, in any case
])
def test_two_hosts_with_one_address_are_refused(kvm0_address: str, kvm1_address: str, tmp_path: Path) -> None:
    """One IP with two names in the DNS (two PTRs), and one host's backup check reaching the other."""
    text = (Path("site.toml").read_text().replace('address = "192.168.50.4"', f'address = "{kvm0_address}"', 1)
            .replace('address = "192.168.50.5"', f'address = "{kvm1_address}"', 1))
    line = [n for n, t in enumerate(text.splitlines(), 1) if t.startswith(f'address = "{kvm1_address}"')][-1]
    assert _problems(_write(tmp_path, text)) == [
        f"{line}:1: key 'hosts.kvm1.address': '{kvm1_address}' is the address of host 'kvm0' too (expected each"
        " host's own address)"]


_ONE_LINE = "(expected text on one line, without control characters such as newline or tab)"
# Free text reaches preseeds, dnsmasq.conf, cloud-init and domain XML as it is.
# (old text, new text, 'LINE:COL: message')
_KEYBOARD_EXPECTED = "expected an xkb layout, optionally with its variant in parentheses, such as us, de or fr(latin9)"
_XKB = "/usr/share/X11/xkb/rules/base.lst"
FREE_TEXT_VALUES = [
    # A newline would add a preseed line of its own: the installer would run it as root.
    ('timezone = "Europe/Berlin"', 'timezone = "Europe/Berlin\\nd-i preseed/late_command string touch /target/PWNED"',
     "7:1: key 'timezone': 'Europe/Berlin\\nd-i preseed/late_command string touch /t...' (65 characters) holds the"
     f" control character '\\n' {_ONE_LINE}"),
    ('mirror_dir = "/debian"', 'mirror_dir = "/debian\\nd-i preseed/late_command string reboot"',
     "81:1: key 'provision.mirror_dir': '/debian\\nd-i preseed/late_command string reboot' holds the control"
     f" character '\\n' {_ONE_LINE}"),
    ('keyboard = "us"', 'keyboard = "us\\tde"',
     f"6:1: key 'keyboard': 'us\\tde' holds the control character '\\t' {_ONE_LINE}"),
    ('compute = "Compute nodes"', 'compute = "Compute\\u0000nodes"',
     f"101:1: key 'hostgroups.compute': 'Compute\\x00nodes' holds the control character '\\x00' {_ONE_LINE}"),
    ('ssh_keys = ["ssh-ed25519', 'ssh_keys = ["ssh-ed25519 AAAA x\\u0085y", "ssh-ed25519',
     "16:1: key 'accounts.ssh_keys': ['ssh-ed25519 AAAA x\\x85y', 'ssh-ed25519 AAAAC3NzaC1lZDI...] holds the"
     f" control character '\\x85' {_ONE_LINE}"),
    ('timezone = "Europe/Berlin"', 'timezone = "Europe/Berlinn"',
     "7:1: key 'timezone': 'Europe/Berlinn' is not a time zone of /usr/share/zoneinfo (expected an IANA name such as"
     " Europe/Berlin or UTC, one that /usr/share/zoneinfo holds: checked where that directory exists)"),
    # A file of /usr/share/zoneinfo that is no zone (no TZif data)
    ('timezone = "Europe/Berlin"', 'timezone = "leapseconds"',
     "7:1: key 'timezone': 'leapseconds' is not a time zone of /usr/share/zoneinfo (expected an IANA name such as"
     " Europe/Berlin or UTC, one that /usr/share/zoneinfo holds: checked where that directory exists)"),
    ('timezone = "Europe/Berlin"', 'timezone = "../../etc/passwd"',
     "7:1: key 'timezone': '../../etc/passwd' is not a time zone name (expected an IANA name such as Europe/Berlin or"
     " UTC)"),
    # The installer would stop at its keyboard question: an empty or misspelt layout is no answer.
    ('keyboard = "us"', 'keyboard = ""',
     f"6:1: key 'keyboard': '' is not a keyboard layout ({_KEYBOARD_EXPECTED})"),
    ('keyboard = "us"', 'keyboard = "US"',
     f"6:1: key 'keyboard': 'US' is not a keyboard layout ({_KEYBOARD_EXPECTED})"),
    ('keyboard = "us"', 'keyboard = "usa"',
     f"6:1: key 'keyboard': 'usa' is not a layout of {_XKB} ({_KEYBOARD_EXPECTED}, one that file lists: checked where"
     " it exists)"),
    ('keyboard = "us"', 'keyboard = "fr(latin0)"',
     f"6:1: key 'keyboard': 'fr(latin0)' is not a layout of {_XKB} ({_KEYBOARD_EXPECTED}, one that file lists:"
     " checked where it exists)"),
    ('locale = "en_US.UTF-8"', 'locale = "en_US.UTF-8 garbage"',
     "5:1: key 'locale': 'en_US.UTF-8 garbage' is not a locale (expected language_COUNTRY.CHARSET such as en_US.UTF-8"
     " or de_DE.UTF-8)"),
    ('mirror_host = "deb.debian.org"', 'mirror_host = "deb.debian.org x"',
     "80:1: key 'provision.mirror_host': 'deb.debian.org x' is not a mirror host (expected a host name or IPv4"
     " address, optionally with :port, such as deb.debian.org or 192.168.1.2:3142)"),
    ('mirror_host = "deb.debian.org"', 'mirror_host = "deb.debian.org:99999"',
     "80:1: key 'provision.mirror_host': 'deb.debian.org:99999' is not a mirror host (expected a host name or IPv4"
     " address, optionally with :port, such as deb.debian.org or 192.168.1.2:3142)"),
    ('mirror_dir = "/debian"', 'mirror_dir = "debian"',
     "81:1: key 'provision.mirror_dir': 'debian' is not an absolute URL path (expected the mirror's directory starting"
     " with '/', without spaces, such as /debian)"),
    ('# mirror_proxy = "http://mcp.phys.example.org:3142"', 'mirror_proxy = "mcp:3142"',
     "82:1: key 'provision.mirror_proxy': 'mcp:3142' is not a proxy URL (expected http://host:port/, or \"\" for"
     " none)"),
    # user-setup refuses it (passwd/username string root), and cloud-init would make root the admin.
    ('admin_user = "admin"', 'admin_user = "root"',
     "12:1: key 'accounts.admin_user': 'root' is a system account of Debian, which the installer refuses as the user"
     " it creates (expected another name than _apt, backup, bin, daemon, games, gnats, irc, list, lp, mail, man, news,"
     " nobody, proxy, root, sync, sys, uucp, www-data)"),
    # <source file='relative/dir/db.img'/> is refused by virt-xml-validate; dnsmasq.conf splits at whitespace.
    ('disk_dir = "/var/lib/libvirt/images"', 'disk_dir = "relative/dir"',
     "43:1: key 'hosts.kvm0.disk_dir': 'relative/dir' is not an absolute path (expected a path starting with '/',"
     " without whitespace, such as /var/lib/libvirt/images)"),
    ('tftp_root = "/srv/tftp"', 'tftp_root = "srv/tftp"',
     "78:1: key 'provision.tftp_root': 'srv/tftp' is not an absolute path (expected a path starting with '/', without"
     " whitespace, such as /srv/tftp)"),
    ('config_dir = "/etc/kvmconf"', 'config_dir = "/etc/kvm conf"',
     "83:1: key 'provision.config_dir': '/etc/kvm conf' is not an absolute path (expected a path starting with '/',"
     " without whitespace, such as /etc/kvmconf)"),
    ('cloud_image = "/var/lib/libvirt/images/base/debian-12-genericcloud-amd64.qcow2"', 'cloud_image = "base.qcow2"',
     "72:1: key 'os.bookworm.cloud_image': 'base.qcow2' is not an absolute path (expected a path starting with '/',"
     " without whitespace, such as /var/lib/libvirt/images/base/debian-12.qcow2)"),
    ('nas_dir = "/mnt/nas/kvmconf"', 'nas_dir = "nas:/kvmconf"',
     "88:1: key 'backup.nas_dir': 'nas:/kvmconf' is not an absolute path (expected a path starting with '/', without"
     " whitespace, such as /mnt/nas/kvmconf)"),
    ('nas_dir = "/mnt/nas/kvmconf"', 'nas_dir = "/var/backups/kvmconf"',
     "88:1: key 'backup.nas_dir': '/var/backups/kvmconf' is, or is nested with, [backup] dir '/var/backups/kvmconf'"
     " (expected the mount point of a NAS share, outside dir)"),
    ('nas_dir = "/mnt/nas/kvmconf"', 'nas_dir = "/var/backups/kvmconf/nas/"',
     "88:1: key 'backup.nas_dir': '/var/backups/kvmconf/nas/' is, or is nested with, [backup] dir"
     " '/var/backups/kvmconf' (expected the mount point of a NAS share, outside dir)"),
    ('nas_dir = "/mnt/nas/kvmconf"', 'nas_dir = "/var/backups"',
     "88:1: key 'backup.nas_dir': '/var/backups' is, or is nested with, [backup] dir '/var/backups/kvmconf'"
     " (expected the mount point of a NAS share, outside dir)"),
    ('checkout = "/root/kvmconf"', 'checkout = "~/kvmconf"',
     "92:1: key 'backup.checkout': '~/kvmconf' is not an absolute path (expected a path starting with '/', without"
     " whitespace, such as /root/kvmconf)"),
    ('scratch_dir = "/var/tmp"', 'scratch_dir = "tmp"',
     "93:1: key 'backup.scratch_dir': 'tmp' is not an absolute path (expected a path starting with '/', without"
     " whitespace, such as /var/tmp)"),
    # 59 bytes: the backup job's unix socket below it would not fit a socket path's 107 bytes.
    ('scratch_dir = "/var/tmp"', f'scratch_dir = "/srv/{"s" * 54}"',
     f"93:1: key 'backup.scratch_dir': '/srv/{'s' * 50}...' (59 characters) is too long (expected at most 58 bytes:"
     " the backup's unix socket goes below it)"),
]


@pytest.mark.parametrize(("old", "new", "expected"), FREE_TEXT_VALUES, ids=[new for _, new, _ in FREE_TEXT_VALUES])
def test_free_text_values_are_checked(old: str, new: str, expected: str, tmp_path: Path) -> None:
    assert EXAMPLE_SITE.count(old) == 1
    assert _problems(_write(tmp_path, EXAMPLE_SITE.replace(old, new))) == [expected]


def test_valid_free_text_values_are_accepted(tmp_path: Path) -> None:
    text = (MINIMAL_SITE.replace('domain = "lab.test"', 'domain = "lab.test"\ntimezone ='
                                 ' "America/Argentina/Buenos_Aires"\nlocale = "de_CH.ISO-8859-1@euro"')
            .replace('interface = "eth0"', 'interface = "eth0"\nmirror_host = "192.168.1.2:3142"\nmirror_dir ='
                     ' "/debian/x~1"\nmirror_proxy = "http://user:pw@proxy:3128/"'))
    site = load_site(_write(tmp_path, text))
    assert (site.timezone, site.locale) == ("America/Argentina/Buenos_Aires", "de_CH.ISO-8859-1@euro")
    for keyboard in ("de", "fr(latin9)", "us(dvorak)", "latam"):
        with_keyboard = text.replace('domain = "lab.test"', f'domain = "lab.test"\nkeyboard = "{keyboard}"')
        assert load_site(_write(tmp_path, with_keyboard)).keyboard == keyboard
    assert (site.provision.mirror_host, site.provision.mirror_dir) == ("192.168.1.2:3142", "/debian/x~1")
    assert site.provision.mirror_proxy == "http://user:pw@proxy:3128/"


def test_without_a_zone_database_only_the_time_zones_form_is_checked(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import generators.site

    monkeypatch.setattr(generators.site, "ZONEINFO", tmp_path / "no-zoneinfo")
    site_path = _write(tmp_path, MINIMAL_SITE.replace('domain = "lab.test"',
                                                      'domain = "lab.test"\ntimezone = "Mars/Olympus"'))
    assert load_site(site_path).timezone == "Mars/Olympus"
    site_path.write_text(MINIMAL_SITE.replace('domain = "lab.test"', 'domain = "lab.test"\ntimezone = "Mars Olympus"'))
    assert _problems(site_path) == ["2:1: key 'timezone': 'Mars Olympus' is not a time zone name (expected an IANA name"
                                    " such as Europe/Berlin or UTC)"]


def test_without_xkb_data_only_the_keyboards_form_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import generators.site

    monkeypatch.setattr(generators.site, "XKB_RULES", tmp_path / "no-base.lst")
    site_path = _write(tmp_path, MINIMAL_SITE.replace('domain = "lab.test"', 'domain = "lab.test"\nkeyboard = "usa"'))
    assert load_site(site_path).keyboard == "usa"
    site_path.write_text(MINIMAL_SITE.replace('domain = "lab.test"', 'domain = "lab.test"\nkeyboard = "us de"'))
    assert _problems(site_path) == [f"2:1: key 'keyboard': 'us de' is not a keyboard layout ({_KEYBOARD_EXPECTED})"]


_ANSIBLE_GROUP_RULE = ("a hostgroup whose Ansible group name, with each character other than a letter, digit or '_'"
                       " made '_', is not all, ungrouped, host_<physical host> or another hostgroup's")


@pytest.mark.parametrize(("group", "clash"), [
    ("web_servers", "the group 'web_servers' of hostgroup 'web-servers'"),
    ("host_kvm1", "the group 'host_kvm1' of physical host 'kvm1'"),
    ("all", "Ansible's own group 'all'"),
    ("ungrouped", "Ansible's own group 'ungrouped'"),
])
def test_hostgroups_whose_ansible_groups_clash(group: str, clash: str, tmp_path: Path) -> None:
    text = EXAMPLE_SITE.replace('compute = "Compute nodes"\n', f'compute = "Compute nodes"\n{group} = "x"\n')
    assert _problems(_write(tmp_path, text)) == [
        f"102:1: key 'hostgroups.{group}': would be {clash} in ansible/inventory.ini (expected {_ANSIBLE_GROUP_RULE})"]


def test_a_misspelt_optional_table_is_told_every_allowed_key(tmp_path: Path) -> None:
    # Neither [backup] nor [hostgroups] is in MINIMAL_SITE: both are allowed all the same.
    assert _problems(_write(tmp_path, MINIMAL_SITE + "[hostgroup]\nweb = 'Web servers'\n")) == [
        "21:1: key 'hostgroup': unknown key (expected one of: accounts, backup, default_network, default_os, domain,"
        " domain_type, hostgroups, hosts, keyboard, locale, networks, os, provision, timezone)"]


def test_a_byte_order_mark_is_accepted_and_columns_stay_right(tmp_path: Path) -> None:
    bom = "\ufeff"  # what Windows editors put first, as cluster.conf allows
    with_bom = load_site(_write(tmp_path, bom + EXAMPLE_SITE))
    plain = load_site(_write(tmp_path, EXAMPLE_SITE, "plain.toml"))
    assert with_bom == dataclasses.replace(plain, path=with_bom.path)
    assert _problems(_write(tmp_path, bom + 'domain = 5\n' + MINIMAL_SITE.split("\n", 1)[1])) == [
        "1:1: key 'domain': 5 is an integer (expected a DNS domain such as cluster.lan)"]
    assert _problems(_write(tmp_path, bom + "domain = = 1\n")) == ["1:10: not valid TOML: Invalid value"]
