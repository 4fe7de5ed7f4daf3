#!/bin/bash
# How veth-lab.pcap and vnet-frames.hex were captured (Linux 6.x, as root, in throw-away network namespaces).
# Topology: fwA (10.1.0.1) -- veth -- fwR (10.1.0.2 / 10.2.0.2, forwarding) -- veth, MTU 1000 -- fwB (10.2.0.1).
# veth-lab.pcap: tx checksum offload off everywhere, so every TCP/UDP/ICMP checksum on the wire is complete.
# vnet-frames.hex: tx offload on, read with an AF_PACKET socket with PACKET_VNET_HDR, so locally sent TCP/UDP
# frames carry CHECKSUM_PARTIAL state (NEEDS_CSUM) and large writes arrive as TSO super-frames.
# The VLAN frame in the tests is built by hand (no 8021q module on the capture host).
set -e
for n in fwA fwR fwB; do ip netns del $n 2>/dev/null || true; ip netns add $n; ip -n $n link set lo up; done
ip link add fwa0 type veth peer name fwr0
ip link add fwr1 type veth peer name fwb0
ip link set fwa0 netns fwA; ip link set fwr0 netns fwR; ip link set fwr1 netns fwR; ip link set fwb0 netns fwB
ip -n fwA link set fwa0 address 02:00:00:00:0a:01
ip -n fwR link set fwr0 address 02:00:00:00:0a:02
ip -n fwR link set fwr1 address 02:00:00:00:0b:02
ip -n fwB link set fwb0 address 02:00:00:00:0b:01
ip -n fwA addr add 10.1.0.1/24 dev fwa0; ip -n fwA link set fwa0 up
ip -n fwR addr add 10.1.0.2/24 dev fwr0; ip -n fwR link set fwr0 up
ip -n fwR addr add 10.2.0.2/24 dev fwr1; ip -n fwR link set fwr1 up mtu 1000
ip -n fwB addr add 10.2.0.1/24 dev fwb0; ip -n fwB link set fwb0 up mtu 1000
ip -n fwA route add default via 10.1.0.2
ip -n fwB route add default via 10.2.0.2
ip netns exec fwR sysctl -qw net.ipv4.ip_forward=1

# ---- veth-lab.pcap
A="ip netns exec fwA"; B="ip netns exec fwB"; R="ip netns exec fwR"
$A ethtool -K fwa0 tx off >/dev/null
$B ethtool -K fwb0 tx off >/dev/null
$R ethtool -K fwr0 tx off >/dev/null
$R ethtool -K fwr1 tx off >/dev/null
$A ip neigh flush all
$B python3 -c "
import socket,time
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1); s.bind(('10.2.0.1',8080)); s.listen(5)
c,_=s.accept(); c.recv(100); c.close(); time.sleep(1)" &
sleep 0.5
$A tcpdump -i fwa0 -w /tmp/veth-lab.pcap -s 2000 -U 2>/dev/null &
TP=$!
sleep 1
$A ping -c1 -W1 10.2.0.1
$A python3 -c "
import socket
s=socket.create_connection(('10.2.0.1',8080)); s.send(b'hello fulcrum'); s.close()"
$A python3 -c "
import socket
s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'udp-probe', ('10.2.0.1',5353))"
sleep 0.3
$A ping -c1 -W1 -M do -s 1200 10.2.0.1
$A ping -c1 -W1 -t 1 10.2.0.1
$A ping -c1 -W1 -M dont -s 1600 10.1.0.2
$A arping -c1 -U -I fwa0 10.1.0.1
$A arping -c1 -A -I fwa0 10.1.0.1
sleep 1
kill $TP
wait

# ---- vnet-frames.hex (the capture script; the .hex file keeps 5 of its lines, with comments)
cat > /tmp/vnetcap.py <<'PY'
import socket, sys, time, struct
ETH_P_ALL = 3
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
s.bind(('fwa0', 0))
s.settimeout(4)
out = open('/tmp/vnet.txt', 'w')
n = 0
try:
    while n < 40:
        d = s.recv(70000)
        out.write(d.hex() + '\n'); n += 1
except socket.timeout:
    pass
out.close()
PY
$A ethtool -K fwa0 tx on tso on gso on >/dev/null
$B python3 -c "
import socket,time
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1); s.bind(('10.2.0.1',8081)); s.listen(5)
c,_=s.accept()
t=time.time()
while time.time()-t<2:
  if not c.recv(100000): break
c.close()" &
sleep 0.5
$A python3 /tmp/vnetcap.py &
CP=$!
$A tcpdump -i fwa0 -w /tmp/partial.pcap -s 2000 -U 2>/dev/null &
TP=$!
sleep 1
$A python3 -c "
import socket
s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'udp-partial', ('10.2.0.1',5353))
s=socket.create_connection(('10.2.0.1',8081)); s.sendall(b'x'*30000); s.close()"
sleep 1
kill $TP; wait $CP
