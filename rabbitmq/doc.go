// Package rabbitmq is the RabbitMQ side of leaf notifications: a
// [branchkey.Broker] that provisions leaves through the RabbitMQ management
// HTTP API, and a [branchkey.Notifier] that publishes messages over AMQP
// 0-9-1 in confirm mode.
//
// The layout follows the wire contract (shared/spec/wire-v1.md):
//
//   - a virtual host per tree, named by the tree id;
//   - a durable fanout exchange per branch, named by the branch id;
//   - a durable queue per leaf, named by the leaf id and bound to its
//     branch's exchange;
//   - an AMQP user per leaf, named by the leaf id, whose password is the
//     leaf's current access token, with no tags and, on its tree's virtual
//     host only, the permissions configure "^$", write "^$" and read
//     "^<leaf id>$": it can consume its own queue and do nothing else.
//
// The server's own AMQP user (the one the Notifier connects as) gets full
// permissions on every virtual host the Broker creates, so that it can
// publish.
//
// AMQP goes through github.com/rabbitmq/amqp091-go, the client the RabbitMQ
// team maintains. The management API is spoken with net/http directly: there
// is no well-kept Go client for it, and the handful of calls needed here
// (PUT /api/vhosts, /api/users, /api/permissions, /api/exchanges,
// /api/queues, POST /api/bindings, GET /api/connections/username and the
// matching DELETEs) do not justify a dependency.
package rabbitmq
